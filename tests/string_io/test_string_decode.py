"""Decoding INS/OUTS from instruction bytes: sizes by mode and prefix, segments, REP."""

from __future__ import annotations

import pytest

from dispatcher import FieldValueError, Segment, decode_string_instruction

# (bytes, code size) -> (is_write, element size, address size, segment, rep, length)
CASES = [
    (b"\x6c", 16, (False, 1, 16, Segment.ES, False, 1)),
    (b"\x6d", 16, (False, 2, 16, Segment.ES, False, 1)),
    (b"\x66\x6d", 16, (False, 4, 16, Segment.ES, False, 2)),
    (b"\x67\xf3\x6d", 16, (False, 2, 32, Segment.ES, True, 3)),
    (b"\x6d", 32, (False, 4, 32, Segment.ES, False, 1)),
    (b"\x66\x6d", 32, (False, 2, 32, Segment.ES, False, 2)),
    (b"\x67\x6d", 32, (False, 4, 16, Segment.ES, False, 2)),
    (b"\x6d", 64, (False, 4, 64, Segment.ES, False, 1)),
    (b"\x48\x6d", 64, (False, 4, 64, Segment.ES, False, 2)),  # REX.W does not make INSQ
    (b"\x67\x66\x6d", 64, (False, 2, 32, Segment.ES, False, 3)),
    (b"\x26\x6c", 32, (False, 1, 32, Segment.ES, False, 2)),  # INS ignores overrides: always ES
    (b"\x64\x6c", 32, (False, 1, 32, Segment.ES, False, 2)),
    (b"\x6e", 32, (True, 1, 32, Segment.DS, False, 1)),
    (b"\x2e\x6f", 32, (True, 4, 32, Segment.CS, False, 2)),
    (b"\x65\x36\x6e", 16, (True, 1, 16, Segment.SS, False, 3)),  # the last override wins
    (b"\xf2\x6e", 16, (True, 1, 16, Segment.DS, True, 2)),  # REPNE repeats INS/OUTS like REP
    (b"\xf3\x66\x67\x2e\x6f", 32, (True, 2, 16, Segment.CS, True, 5)),
]


@pytest.mark.parametrize(("code", "bits", "expected"), CASES)
def test_decode(code: bytes, bits: int, expected: tuple[object, ...]) -> None:
    ins = decode_string_instruction(code.ljust(16, b"\0"), len(code), bits)
    assert (ins.is_write, ins.element_size, ins.address_size, ins.segment, ins.rep, ins.length) == expected
    assert ins.opcode == code[-1]


@pytest.mark.parametrize(
    ("code", "count", "bits", "field", "offset"),
    [
        (b"\x6c", 0, 32, "instruction_byte_count", 59),
        (b"\xf3\x6d", 1, 32, "instruction_bytes", 73),
        (b"\x90", 1, 32, "instruction_bytes", 72),
        (b"\xf3\xa4", 2, 32, "instruction_bytes", 73),  # REP MOVSB
        (b"\xf0\x6c", 2, 32, "instruction_bytes", 72),
        (b"\x40\x6c", 2, 32, "instruction_bytes", 72),  # INC EAX outside 64-bit mode
        (b"\x26" * 16, 16, 16, "instruction_bytes", 87),
    ],
)
def test_bad_bytes_name_the_offset(code: bytes, count: int, bits: int, field: str, offset: int) -> None:
    with pytest.raises(FieldValueError) as caught:
        decode_string_instruction(code.ljust(16, b"\0"), count, bits)
    assert caught.value.field == field and caught.value.offset == offset
