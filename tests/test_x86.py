"""The one port I/O instruction decoder and encoder: every form, prefix and mode."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher import InstructionError, Segment, decode_io_instruction, encode_io_instruction
from dispatcher.x86 import code_size, ip_mask, next_ip

# (bytes, code size) -> (is_write, string, size, address size, port, memory segment, rep, length)
CASES = [
    (b"\xe4\x80", 16, (False, False, 1, 16, 0x80, Segment.ES, False, 2)),  # in al, 0x80
    (b"\xe5\x80", 16, (False, False, 2, 16, 0x80, Segment.ES, False, 2)),  # in ax, 0x80
    (b"\x66\xe5\x80", 16, (False, False, 4, 16, 0x80, Segment.ES, False, 3)),  # in eax, 0x80
    (b"\xe5\x80", 32, (False, False, 4, 32, 0x80, Segment.ES, False, 2)),
    (b"\xe7\x70", 32, (True, False, 4, 32, 0x70, Segment.DS, False, 2)),  # out 0x70, eax
    (b"\x66\xef", 32, (True, False, 2, 32, None, Segment.DS, False, 2)),  # out dx, ax
    (b"\xee", 64, (True, False, 1, 64, None, Segment.DS, False, 1)),  # out dx, al
    (b"\x48\xed", 64, (False, False, 4, 64, None, Segment.ES, False, 2)),  # REX.W does not widen IN
    (b"\xf3\xec", 32, (False, False, 1, 32, None, Segment.ES, False, 2)),  # REP means nothing to IN
    (b"\x6c", 16, (False, True, 1, 16, None, Segment.ES, False, 1)),
    (b"\x6d", 16, (False, True, 2, 16, None, Segment.ES, False, 1)),
    (b"\x66\x6d", 16, (False, True, 4, 16, None, Segment.ES, False, 2)),
    (b"\x67\xf3\x6d", 16, (False, True, 2, 32, None, Segment.ES, True, 3)),
    (b"\x6d", 32, (False, True, 4, 32, None, Segment.ES, False, 1)),
    (b"\x66\x6d", 32, (False, True, 2, 32, None, Segment.ES, False, 2)),
    (b"\x67\x6d", 32, (False, True, 4, 16, None, Segment.ES, False, 2)),
    (b"\x6d", 64, (False, True, 4, 64, None, Segment.ES, False, 1)),
    (b"\x48\x6d", 64, (False, True, 4, 64, None, Segment.ES, False, 2)),  # REX.W does not make INSQ
    (b"\x48\xf3\x6d", 64, (False, True, 4, 64, None, Segment.ES, True, 3)),  # REX before a legacy prefix
    (b"\x67\x66\x6d", 64, (False, True, 2, 32, None, Segment.ES, False, 3)),
    (b"\x26\x6c", 32, (False, True, 1, 32, None, Segment.ES, False, 2)),  # INS ignores overrides: always ES
    (b"\x64\x6c", 32, (False, True, 1, 32, None, Segment.ES, False, 2)),
    (b"\x6e", 32, (True, True, 1, 32, None, Segment.DS, False, 1)),
    (b"\x2e\x6f", 32, (True, True, 4, 32, None, Segment.CS, False, 2)),
    (b"\x64\xf3\x6e", 32, (True, True, 1, 32, None, Segment.FS, True, 3)),
    (b"\x65\x36\x6e", 16, (True, True, 1, 16, None, Segment.SS, False, 3)),  # the last override wins
    (b"\xf2\x6e", 16, (True, True, 1, 16, None, Segment.DS, True, 2)),  # REPNE repeats INS/OUTS like REP
    (b"\xf3\x66\x67\x2e\x6f", 32, (True, True, 2, 16, None, Segment.CS, True, 5)),
]


@pytest.mark.parametrize(("code", "bits", "expected"), CASES)
def test_decode(code: bytes, bits: int, expected: tuple[object, ...]) -> None:
    # Bytes after the instruction (here NOPs) are not part of it.
    insn = decode_io_instruction(code + b"\x90" * 4, bits)
    assert (insn.is_write, insn.string, insn.size, insn.address_size, insn.port, insn.segment, insn.rep,
            insn.length) == expected  # fmt: skip
    assert insn.opcode == code[-2 if insn.port is not None else -1]


@pytest.mark.parametrize(
    ("code", "bits", "index", "value"),
    [
        (b"\x90", 32, 0, 0x90),  # NOP
        (b"\xf3\xa4", 32, 1, 0xA4),  # REP MOVSB
        (b"\xf0\xe4\x80", 64, 0, 0xF0),  # LOCK IN: #UD
        (b"\xf0\x6c", 32, 0, 0xF0),
        (b"\x40\x6c", 32, 0, 0x40),  # INC EAX outside 64-bit mode
        (b"\x48\xed", 32, 0, 0x48),  # DEC EAX outside 64-bit mode
        (b"\x48\x90", 64, 1, 0x90),  # REX before a non-I/O opcode
        (b"\xe4", 64, 1, None),  # the port byte is missing
        (b"", 64, 0, None),
        (b"\xf3", 32, 1, None),  # the bytes end before the opcode
        (b"\x26" * 16, 16, 15, 0x26),  # no opcode within 15 bytes
        (b"\x66" * 14 + b"\xe4\x80", 32, 14, 0xE4),  # 16 bytes with the port byte
    ],
)
def test_bad_bytes_name_the_byte(code: bytes, bits: int, index: int, value: int | None) -> None:
    with pytest.raises(InstructionError) as caught:
        decode_io_instruction(code, bits)
    assert (caught.value.index, caught.value.value) == (index, value)
    assert f"instruction byte {index}" in str(caught.value)


@given(
    bits=st.sampled_from([16, 32, 64]),
    write=st.booleans(),
    size=st.sampled_from([1, 2, 4]),
    form=st.sampled_from(["imm8", "dx", "string"]),
    rep=st.booleans(),
    port=st.integers(0, 0xFF),
    other_address=st.booleans(),
    override=st.none() | st.sampled_from(list(Segment)),
)
def test_the_encoder_and_decoder_agree(
    bits: int,
    write: bool,
    size: int,
    form: str,
    rep: bool,
    port: int,
    other_address: bool,
    override: Segment | None,
) -> None:
    string = form == "string"
    address_size = (32 if bits != 32 else 16) if string and other_address else None
    code = encode_io_instruction(
        write=write,
        size=size,
        bits=bits,
        string=string,
        rep=rep and string,
        port=port if form == "imm8" else None,
        address_size=address_size,
        override=override if string else None,
    )
    insn = decode_io_instruction(code, bits)
    assert (insn.is_write, insn.size, insn.string, insn.rep, insn.length) == (write, size, string, rep and string,
                                                                               len(code))  # fmt: skip
    assert insn.port == (port if form == "imm8" else None)
    assert insn.address_size == (address_size or bits)
    assert insn.override == (override if string else None)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"write": False, "size": 1, "bits": 16, "port": 0x60}, b"\xe4\x60"),
        ({"write": True, "size": 4, "bits": 16}, b"\x66\xef"),
        ({"write": True, "size": 2, "bits": 32}, b"\x66\xef"),
        ({"write": False, "size": 4, "bits": 64, "port": 0x71}, b"\xe5\x71"),
        ({"write": False, "size": 2, "bits": 32, "string": True, "rep": True}, b"\x66\xf3\x6d"),
        ({"write": True, "size": 1, "bits": 64, "string": True, "address_size": 32}, b"\x67\x6e"),
        (
            {
                "write": True,
                "size": 4,
                "bits": 16,
                "string": True,
                "rep": True,
                "address_size": 32,
                "override": Segment.FS,
            },
            b"\x64\x66\x67\xf3\x6f",
        ),
    ],
)
def test_the_encoder_gives_the_shortest_encoding(arguments: dict[str, object], expected: bytes) -> None:
    assert encode_io_instruction(**arguments) == expected  # type: ignore[arg-type]


def test_the_encoder_refuses_what_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="size"):
        encode_io_instruction(write=True, size=8, bits=64)
    with pytest.raises(ValueError, match="INS/OUTS only"):
        encode_io_instruction(write=True, size=1, bits=32, rep=True)
    with pytest.raises(ValueError, match="imm8"):
        encode_io_instruction(write=True, size=1, bits=32, port=0x100)
    with pytest.raises(ValueError, match="16-bit address"):
        encode_io_instruction(write=True, size=1, bits=64, string=True, address_size=16)


@pytest.mark.parametrize(
    ("state", "cs_attributes", "bits"),
    [
        (0x00, 0x009B, 16),  # real mode
        (0x04, 0xC09B, 32),  # protected mode, CS.D
        (0x14, 0xA09B, 64),  # long mode, CS.L
        (0x14, 0xC09B, 32),  # compatibility mode: EFER.LMA without CS.L
        (0x04, 0xA09B, 16),  # CS.L means nothing without EFER.LMA
    ],
)
def test_code_size(state: int, cs_attributes: int, bits: int) -> None:
    assert code_size(state, cs_attributes) == bits
    assert next_ip(ip_mask(bits), 2, state, cs_attributes) == 1  # the IP wraps at the code size
