"""The x86 port I/O instructions: decode and encode IN, OUT, INS and OUTS, and the code-size rules.

Only what a port I/O instruction can hold is accepted: legacy prefixes
(segment overrides 26/2E/36/3E/64/65, operand size 66, address size 67, REP
F3 and REPNE F2, which string I/O treats alike), REX in 64-bit code, then one
of the opcodes E4-E7, EC-EF or 6C-6F (and E4-E7's port byte). Anything else
raises :class:`InstructionError` naming the byte: a LOCK prefix (#UD on port
I/O), another opcode, bytes that end too soon, or more than 15 bytes.

Several prefixes of one group act as the last of them (what processors do;
the SDM leaves it undefined). A REX prefix has no effect on port I/O
wherever it stands among the prefixes: REX.W does not widen it.
"""

from __future__ import annotations

import enum
from functools import lru_cache
from typing import Final, NamedTuple

from .errors import DispatchError

__all__ = [
    "IP_MASK_BY_MODE",
    "MAX_INSTRUCTION_LENGTH",
    "InstructionError",
    "IoInstruction",
    "Segment",
    "code_size",
    "decode_io_instruction",
    "encode_io_instruction",
    "ip_mask",
    "mode_index",
    "next_ip",
]

MAX_INSTRUCTION_LENGTH: Final = 15


class Segment(enum.IntEnum):
    """Segment registers, numbered as the x86 encodes them."""

    ES = 0
    CS = 1
    SS = 2
    DS = 3
    FS = 4
    GS = 5


_OVERRIDES: Final = {0x26: Segment.ES, 0x2E: Segment.CS, 0x36: Segment.SS, 0x3E: Segment.DS, 0x64: Segment.FS,
                     0x65: Segment.GS}  # fmt: skip
_PREFIX_OF: Final = {segment: byte for byte, segment in _OVERRIDES.items()}
# opcode -> (is_write, string, has the port byte)
_OPCODES: Final = {
    0xE4: (False, False, True),  # in al, imm8
    0xE5: (False, False, True),  # in eax, imm8
    0xE6: (True, False, True),  # out imm8, al
    0xE7: (True, False, True),  # out imm8, eax
    0xEC: (False, False, False),  # in al, dx
    0xED: (False, False, False),  # in eax, dx
    0xEE: (True, False, False),  # out dx, al
    0xEF: (True, False, False),  # out dx, eax
    0x6C: (False, True, False),  # insb
    0x6D: (False, True, False),  # insw/insd
    0x6E: (True, True, False),  # outsb
    0x6F: (True, True, False),  # outsw/outsd
}


class InstructionError(DispatchError):
    """The bytes are not a port I/O instruction. ``index`` is the offending byte's position
    (the number of bytes given when they end too soon), ``value`` that byte or None."""

    def __init__(self, reason: str, *, index: int, value: int | None) -> None:
        shown = "missing" if value is None else f"{value:#04x}"
        super().__init__(f"instruction byte {index} = {shown}: {reason}")
        self.reason = reason
        self.index = index
        self.value = value


class IoInstruction(NamedTuple):
    """A decoded port I/O instruction, sized for the mode it was decoded in.

    ``size`` is the access width in bytes (1, 2 or 4); ``address_size`` the
    width in bits (16, 32 or 64) of rCX, rSI and rDI for the string forms;
    ``length`` counts prefixes, opcode and port byte. ``port`` is the imm8
    port, None for the DX forms. ``override`` is the segment-override prefix
    given, ``segment`` where a string form's memory operand lives: ES for
    INS (no override applies), the override or DS for OUTS.
    """

    opcode: int
    length: int
    is_write: bool
    string: bool
    rep: bool
    size: int
    address_size: int
    port: int | None
    override: Segment | None

    @property
    def segment(self) -> Segment:
        if not self.is_write:
            return Segment.ES
        return Segment.DS if self.override is None else self.override


def code_size(execution_state: int, cs_attributes: int) -> int:
    """16, 32 or 64: the code size from ExecutionState (EFER.LMA is bit 4) and CS's attributes (L, D)."""
    if execution_state & 0x10 and cs_attributes & 0x2000:
        return 64
    return 32 if cs_attributes & 0x4000 else 16


_IP_MASKS: Final = {16: 0xFFFF, 32: 0xFFFF_FFFF, 64: (1 << 64) - 1}


def ip_mask(bits: int) -> int:
    """The mask that wraps an instruction pointer in code of ``bits`` bits."""
    return _IP_MASKS[bits]


@lru_cache(maxsize=4096)
def decode_io_instruction(code: bytes, bits: int) -> IoInstruction:
    """Decode the port I/O instruction at the start of ``code``, in code of ``bits`` bits (16, 32 or 64).

    Bytes past the instruction are ignored. Raises :class:`InstructionError`.
    """
    operand_prefix = address_prefix = rep = False
    override: Segment | None = None
    limit = min(len(code), MAX_INSTRUCTION_LENGTH)
    for i in range(limit):
        byte = code[i]
        if byte in _OPCODES:
            break
        if byte in _OVERRIDES:
            override = _OVERRIDES[byte]
        elif byte == 0x66:
            operand_prefix = True
        elif byte == 0x67:
            address_prefix = True
        elif byte in (0xF2, 0xF3):
            rep = True
        elif bits == 64 and 0x40 <= byte <= 0x4F:
            pass  # REX: no effect on port I/O
        else:
            reason = "a LOCK prefix on port I/O (#UD)" if byte == 0xF0 else "not a port I/O instruction"
            raise InstructionError(reason, index=i, value=byte)
    else:
        if len(code) > MAX_INSTRUCTION_LENGTH:
            raise InstructionError(
                f"no opcode within the {MAX_INSTRUCTION_LENGTH}-byte instruction limit",
                index=MAX_INSTRUCTION_LENGTH,
                value=code[MAX_INSTRUCTION_LENGTH],
            )
        raise InstructionError("the bytes end before the opcode", index=len(code), value=None)
    is_write, string, has_port = _OPCODES[byte]
    length = i + 1 + has_port
    if length > MAX_INSTRUCTION_LENGTH:
        raise InstructionError(f"longer than the {MAX_INSTRUCTION_LENGTH}-byte instruction limit", index=i, value=byte)
    if has_port and len(code) < length:
        raise InstructionError("the bytes end before the port number", index=len(code), value=None)
    # 66 and 67 flip 16 <-> 32 from the code size; 64-bit code has 32-bit
    # operands and 64-bit addresses by default, and 67 gives 32-bit ones.
    size = 1 if not byte & 1 else 4 if (bits == 16) == operand_prefix else 2
    address_size = (32 if address_prefix else 64) if bits == 64 else 16 if (bits == 32) == address_prefix else 32
    port = code[i + 1] if has_port else None
    return IoInstruction(byte, length, is_write, string, rep and string, size, address_size, port, override)


def encode_io_instruction(
    *,
    write: bool,
    size: int,
    bits: int,
    string: bool = False,
    rep: bool = False,
    port: int | None = None,
    address_size: int | None = None,
    override: Segment | None = None,
) -> bytes:
    """The shortest encoding: [segment] [66] [67] [F3] opcode [port].

    ``port`` (0-255) picks the imm8 form of IN/OUT, else the DX form;
    ``address_size`` (bits) defaults to the code's.
    """
    if size not in (1, 2, 4):
        raise ValueError(f"size must be 1, 2 or 4, not {size}")
    if bits not in _IP_MASKS:
        raise ValueError(f"bits must be 16, 32 or 64, not {bits}")
    if (rep or override is not None or address_size is not None) and not string:
        raise ValueError("REP, a segment override and an address size go with INS/OUTS only")
    if port is not None and (string or not 0 <= port <= 0xFF):
        raise ValueError(f"an imm8 port is 0..255 on IN/OUT, not {port}")
    code = bytearray()
    if override is not None:
        code.append(_PREFIX_OF[override])
    operand = 2 if bits == 16 else 4
    if size > 1 and size != operand:
        code.append(0x66)
    default_address = bits
    if address_size is not None and address_size != default_address:
        if address_size != (32 if bits != 32 else 16):
            raise ValueError(f"a {address_size}-bit address cannot be encoded in {bits}-bit code")
        code.append(0x67)
    if rep:
        code.append(0xF3)
    if string:
        code.append((0x6E if write else 0x6C) | (size > 1))
    elif port is not None:
        code += bytes(((0xE6 if write else 0xE4) | (size > 1), port))
    else:
        code.append((0xEE if write else 0xEC) | (size > 1))
    return bytes(code)


def mode_index(execution_state: int, cs_attributes: int) -> int:
    """The bits the code size depends on (EFER.LMA, CS.L, CS.D) as one small index into :data:`IP_MASK_BY_MODE`."""
    return execution_state & 0x10 | cs_attributes >> 13 & 3


IP_MASK_BY_MODE: Final = tuple(ip_mask(code_size(i & 0x10, (i & 3) << 13)) for i in range(0x14))
"""The IP mask by :func:`mode_index`: a hot path computes the index inline and skips two calls."""


def next_ip(ip: int, length: int, execution_state: int, cs_attributes: int) -> int:
    """The instruction pointer past an instruction of ``length`` bytes, wrapped to the code size."""
    return (ip + length) & IP_MASK_BY_MODE[mode_index(execution_state, cs_attributes)]
