"""Decode the x86 port I/O instructions (IN, OUT, INS, OUTS) from their bytes.

KVM's I/O exit says which port, width and count, but not where the
instruction starts or how long it is; a VMM that must report
``instruction_length``/``InstructionBytes`` (as the Hyper-V intercept message
does) decodes the bytes at CS:RIP itself. Only the prefixes and opcodes that
can form an I/O instruction are understood.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_INSTRUCTION_LENGTH", "IoInstruction", "decode_io_instruction"]

MAX_INSTRUCTION_LENGTH: Final = 15

_SEGMENT_PREFIXES: Final = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
_OTHER_PREFIXES: Final = frozenset({0x66, 0x67, 0xF0, 0xF2, 0xF3})

# opcode -> (is_in, string, byte_sized, has_imm8)
_OPCODES: Final = {
    0xE4: (True, False, True, True),  # in al, imm8
    0xE5: (True, False, False, True),  # in eAX, imm8
    0xE6: (False, False, True, True),  # out imm8, al
    0xE7: (False, False, False, True),  # out imm8, eAX
    0xEC: (True, False, True, False),  # in al, dx
    0xED: (True, False, False, False),  # in eAX, dx
    0xEE: (False, False, True, False),  # out dx, al
    0xEF: (False, False, False, False),  # out dx, eAX
    0x6C: (True, True, True, False),  # insb
    0x6D: (True, True, False, False),  # insw/insd
    0x6E: (False, True, True, False),  # outsb
    0x6F: (False, True, False, False),  # outsw/outsd
}


@dataclass(frozen=True, slots=True)
class IoInstruction:
    """A decoded port I/O instruction."""

    length: int  # bytes, prefixes included
    opcode: int
    is_in: bool
    string: bool  # INS/OUTS
    rep: bool  # F3 (or F2, which string I/O treats the same) present
    size: int  # access width in bytes: 1, 2 or 4
    address_size: int  # 2, 4 or 8: width of (R/E)CX, (R/E)SI, (R/E)DI for string forms
    port: int | None  # the imm8 port, None for the DX forms
    segment: str | None  # segment-override prefix, if any ("es", "cs", ... "gs")


def decode_io_instruction(code: bytes, *, long_mode: bool, default_32bit: bool) -> IoInstruction | None:
    """Decode the I/O instruction at the start of ``code``; None if it is not one.

    ``long_mode``: CS.L = 1 (64-bit code). ``default_32bit``: CS.D = 1 (ignored
    in 64-bit code). LOCK makes the instruction invalid (#UD), so it yields None.
    """
    operand_32 = True if long_mode else default_32bit
    address_size = 8 if long_mode else (4 if default_32bit else 2)
    rep = False
    segment: str | None = None
    i = 0
    limit = min(len(code), MAX_INSTRUCTION_LENGTH)
    while i < limit:
        byte = code[i]
        if byte in _SEGMENT_PREFIXES:
            segment = _SEGMENT_PREFIXES[byte]
        elif byte in _OTHER_PREFIXES:
            if byte == 0xF0:
                return None
            if byte == 0x66:
                operand_32 = not (True if long_mode else default_32bit)
            elif byte == 0x67:
                address_size = 4 if long_mode else (2 if default_32bit else 4)
            else:
                rep = True
        elif long_mode and 0x40 <= byte <= 0x4F:
            # REX counts only directly before the opcode; W does not widen port I/O.
            if i + 1 < limit and code[i + 1] in _OPCODES:
                pass
            elif i + 1 < limit and (code[i + 1] in _SEGMENT_PREFIXES or code[i + 1] in _OTHER_PREFIXES):
                pass  # a REX followed by a legacy prefix is ignored
            else:
                return None
        else:
            break
        i += 1
    if i >= limit or code[i] not in _OPCODES:
        return None
    opcode = code[i]
    is_in, string, byte_sized, has_imm8 = _OPCODES[opcode]
    length = i + 1 + (1 if has_imm8 else 0)
    if length > limit:
        return None
    size = 1 if byte_sized else (4 if operand_32 else 2)
    return IoInstruction(
        length=length,
        opcode=opcode,
        is_in=is_in,
        string=string,
        rep=rep and string,
        size=size,
        address_size=address_size,
        port=code[i + 1] if has_imm8 else None,
        segment=segment,
    )
