"""The I/O instruction decoder (pure, no KVM needed)."""

from __future__ import annotations

import pytest

from transports.kvm.insn import decode_io_instruction


@pytest.mark.parametrize(
    ("code", "long_mode", "d32", "length", "size", "port", "string", "rep", "addr", "seg"),
    [
        (b"\xe4\x80", False, False, 2, 1, 0x80, False, False, 2, None),  # in al, 0x80 (16-bit code)
        (b"\xe5\x80", False, False, 2, 2, 0x80, False, False, 2, None),  # in ax, 0x80
        (b"\x66\xe5\x80", False, False, 3, 4, 0x80, False, False, 2, None),  # in eax, 0x80
        (b"\xe5\x80", False, True, 2, 4, 0x80, False, False, 4, None),  # in eax, 0x80 (32-bit code)
        (b"\x66\xef", False, True, 2, 2, None, False, False, 4, None),  # out dx, ax
        (b"\xee", True, False, 1, 1, None, False, False, 8, None),  # out dx, al (64-bit)
        (b"\x48\xed", True, False, 2, 4, None, False, False, 8, None),  # rex.w in eax, dx: still 32-bit
        (b"\xf3\x6c", True, False, 2, 1, None, True, True, 8, None),  # rep insb
        (b"\x67\xf3\x6c", True, False, 3, 1, None, True, True, 4, None),  # a32 rep insb
        (b"\x67\xf3\x6e", False, True, 3, 1, None, True, True, 2, None),  # a16 rep outsb
        (b"\x64\xf3\x6e", False, True, 3, 1, None, True, True, 4, "fs"),  # fs rep outsb
        (b"\xf3\x66\x6f", False, True, 3, 2, None, True, True, 4, None),  # rep outsw
        (b"\x6d", False, False, 1, 2, None, True, False, 2, None),  # insw (16-bit code)
    ],
)
def test_decodes(
    code: bytes,
    long_mode: bool,
    d32: bool,
    length: int,
    size: int,
    port: int | None,
    string: bool,
    rep: bool,
    addr: int,
    seg: str | None,
) -> None:
    insn = decode_io_instruction(code + b"\x90" * 4, long_mode=long_mode, default_32bit=d32)
    assert insn is not None
    assert (insn.length, insn.size, insn.port, insn.string, insn.rep, insn.address_size, insn.segment) == (
        length,
        size,
        port,
        string,
        rep,
        addr,
        seg,
    )


@pytest.mark.parametrize(
    "code",
    [
        b"\x90",  # nop
        b"\xf0\xe4\x80",  # lock in: #UD
        b"\xe4",  # truncated imm8
        b"\x48\x90",  # REX before a non-I/O opcode
        b"",
        b"\x66" * 15 + b"\xee",  # longer than 15 bytes
    ],
)
def test_rejects(code: bytes) -> None:
    assert decode_io_instruction(code, long_mode=True, default_32bit=False) is None


def test_rex_is_only_an_opcode_byte_outside_long_mode() -> None:
    # 0x48 is DEC AX in 16/32-bit code, so "48 ED" is not an I/O instruction there.
    assert decode_io_instruction(b"\x48\xed", long_mode=False, default_32bit=True) is None
