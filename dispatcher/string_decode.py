"""Decode a string I/O instruction (INS/OUTS) from the bytes an intercept carries.

Only what INS and OUTS can hold is accepted: legacy prefixes (segment
overrides 26/2E/36/3E/64/65, operand size 66, address size 67, REP F3 and
REPNE F2), REX in 64-bit mode, then opcode 6C-6F. Anything else, a LOCK
prefix (#UD on a string I/O instruction), bytes that end before the opcode,
or more than 15 bytes is a :class:`~dispatcher.errors.FieldValueError`
naming the frame offset of the offending byte.
"""

from __future__ import annotations

import enum
from functools import lru_cache
from typing import NamedTuple

from .errors import FieldValueError
from .x86 import Segment

__all__ = ["Segment", "StringInstruction", "decode_string_instruction"]

_BYTES_OFFSET = 72  # InstructionBytes in the intercept frame
_COUNT_OFFSET = 59  # InstructionByteCount
_MAX_LENGTH = 15  # the architectural limit of an x86 instruction


_OVERRIDES = {
    0x26: Segment.ES,
    0x2E: Segment.CS,
    0x36: Segment.SS,
    0x3E: Segment.DS,
    0x64: Segment.FS,
    0x65: Segment.GS,
}


class StringInstruction(NamedTuple):
    """A decoded INS or OUTS, sized for the mode it was decoded in.

    ``segment`` is where the memory operand lives: ES for INS (no override
    applies), DS or the last override for OUTS. ``element_size`` is 1, 2 or
    4 bytes; ``address_size`` is 16, 32 or 64 bits; ``length`` counts the
    prefixes and the opcode.
    """

    opcode: int
    length: int
    is_write: bool
    element_size: int
    address_size: int
    segment: Segment
    rep: bool


@lru_cache(maxsize=512)
def decode_string_instruction(data: bytes, count: int, code: int) -> StringInstruction:
    """Decode the first ``count`` bytes of ``data`` as INS or OUTS in code of ``code`` bits.

    The code size is 64 in 64-bit mode (EFER.LMA and CS.L), else 32 with CS.D
    set, else 16.

    Several prefixes of a group act as the last of them (what processors
    do; the SDM leaves it undefined). A REX prefix (64-bit mode only) has no
    effect on INS/OUTS wherever it stands: REX.W does not widen them.
    """
    if count == 0:
        raise FieldValueError(
            "a string I/O intercept needs its instruction bytes",
            field="instruction_byte_count",
            offset=_COUNT_OFFSET,
            value=0,
        )
    segment = None
    operand_prefix = address_prefix = rep = False
    for i in range(min(count, _MAX_LENGTH)):
        byte = data[i]
        if 0x6C <= byte <= 0x6F:
            break
        if byte in _OVERRIDES:
            segment = _OVERRIDES[byte]
        elif byte == 0x66:
            operand_prefix = True
        elif byte == 0x67:
            address_prefix = True
        elif byte in (0xF2, 0xF3):
            rep = True
        elif code == 64 and 0x40 <= byte <= 0x4F:
            pass  # REX: no effect on INS/OUTS, wherever it stands
        else:
            reason = "LOCK prefix on a string I/O instruction (#UD)" if byte == 0xF0 else "not INS or OUTS"
            raise FieldValueError(reason, field="instruction_bytes", offset=_BYTES_OFFSET + i, value=byte)
    else:
        if count > _MAX_LENGTH:
            raise FieldValueError(
                f"no opcode within the {_MAX_LENGTH}-byte instruction limit",
                field="instruction_bytes",
                offset=_BYTES_OFFSET + _MAX_LENGTH,
                value=data[_MAX_LENGTH],
            )
        raise FieldValueError(
            "the instruction bytes end before the opcode",
            field="instruction_bytes",
            offset=_BYTES_OFFSET + count,
            value=None,
        )
    is_write = byte >= 0x6E
    # 0x66 and 0x67 flip 16 <-> 32 from the code size; 64-bit code has 32-bit
    # operands and 64-bit addresses by default, and 0x67 gives 32-bit ones.
    size = 1 if not byte & 1 else 4 if (code == 16) == operand_prefix else 2
    address_size = (32 if address_prefix else 64) if code == 64 else 16 if (code == 32) == address_prefix else 32
    effective = Segment.ES if not is_write else Segment.DS if segment is None else segment
    return StringInstruction(byte, i + 1, is_write, size, address_size, effective, rep)
