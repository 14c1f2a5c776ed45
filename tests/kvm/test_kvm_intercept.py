"""Intercept frames from KVM exit state, and completions back to KVM state, without /dev/kvm.

The exit state is built the way the vCPU thread captures it; each frame is
read back with the project's own codec, so the layout is checked against
docs/PROTOCOL.md's.
"""

from __future__ import annotations

import pytest

from dispatcher import (
    AccessType,
    Completion,
    FieldValueError,
    FrameError,
    Registers,
    SegmentAttributes,
    SegmentRegister,
    ShortFrameError,
    Status,
    UnknownMessageTypeError,
    decode_completion,
    decode_message,
)
from transports.kvm.intercept import (
    FrameBuilder,
    IoCapture,
    IoDecodeError,
    IoKind,
    merge_in,
    plan_completion,
    read_completion,
)
from transports.kvm.syncregs import CpuContext

REAL_CS = SegmentRegister(0, 0xFFFF, 0, SegmentAttributes(0x9B))
FLAT_CS = SegmentRegister(0, 0xFFFF_FFFF, 0x08, SegmentAttributes(0xC09B))
FLAT_DS = SegmentRegister(0, 0xFFFF_FFFF, 0x10, SegmentAttributes(0xC093))
REAL_DS = SegmentRegister(0, 0xFFFF, 0, SegmentAttributes(0x93))
REAL = CpuContext(REAL_CS, REAL_DS, REAL_DS, REAL_DS, REAL_DS, REAL_DS, cr0=0x10, efer=0, cpl=0)
PROTECTED = CpuContext(FLAT_CS, FLAT_DS, FLAT_DS, FLAT_DS, FLAT_DS, FLAT_DS, cr0=0x11, efer=0, cpl=0)


def regs(
    *, rax: int = 0, rcx: int = 0, rdx: int = 0, rsi: int = 0, rdi: int = 0, rip: int, rflags: int = 2
) -> tuple[int, ...]:
    values = [0] * 18
    values[0], values[2], values[3], values[4], values[5], values[16], values[17] = rax, rcx, rdx, rsi, rdi, rip, rflags
    return tuple(values)


def capture(is_write: bool, size: int, port: int, registers: tuple[int, ...], *, context: CpuContext = REAL,
            count: int = 1, code_at: bytes = b"", code_before: bytes = b"", plain_out: bool = False,
            data: bytes = b"") -> IoCapture:  # fmt: skip
    return IoCapture(is_write, size, port, count, registers, context, False, False, 0, data, code_at, code_before,
                     plain_out)  # fmt: skip


def builder(out_rip_advanced: bool = True) -> FrameBuilder:
    return FrameBuilder(vp_index=3, partition=7, out_rip_advanced=out_rip_advanced, read_linear=lambda a, n: None)


def test_a_posted_out_is_found_before_rip_and_reported_at_its_own_address() -> None:
    # out 0x80, al at 7C10; KVM reports RIP 7C12 (past it), as kvm-pvm does.
    pending = builder().build(
        capture(True, 1, 0x80, regs(rax=0x1122_3344_5566_7788, rip=0x7C12), code_before=b"\x90\xe6\x80", plain_out=True)
    )
    message = decode_message(pending.frame)
    assert (message.rip, message.instruction_length, message.port_number) == (0x7C10, 2, 0x80)
    assert message.access_type is AccessType.WRITE and message.access_info == 1
    assert message.rax == 0x1122_3344_5566_7788 and message.vp_index == 3 and message.source_partition == 7
    assert message.instruction_byte_count == 0 and (message.rcx, message.rsi, message.rdi) == (0, 0, 0)
    assert message.cs_segment == REAL_CS and message.execution_state == 0
    assert pending.kind is IoKind.OUT and pending.kvm_after[0] == 0x7C12


def test_an_out_on_a_host_that_leaves_rip_at_it_is_decoded_forward() -> None:
    pending = builder(out_rip_advanced=False).build(
        capture(True, 2, 0x1F0, regs(rdx=0x1F0, rip=0x2000), context=PROTECTED, code_at=b"\x66\xef\x90")
    )
    message = decode_message(pending.frame)
    assert (message.rip, message.instruction_length, message.access_info) == (0x2000, 2, 2)
    assert message.execution_state.cr0_pe


def test_the_operand_size_prefix_is_told_by_the_access_size() -> None:
    # 32-bit code: "66 EF" is out dx, ax (2 bytes); "EF" alone would be a 4-byte OUT.
    word = builder().build(capture(True, 2, 0x60, regs(rdx=0x60, rip=0x100), context=PROTECTED,
                                   code_before=b"\x90\x66\xef", plain_out=True))  # fmt: skip
    dword = builder().build(capture(True, 4, 0x60, regs(rdx=0x60, rip=0x100), context=PROTECTED,
                                    code_before=b"\x90\x66\xef", plain_out=True))  # fmt: skip
    assert decode_message(word.frame).rip == 0xFE
    assert decode_message(dword.frame).rip == 0xFF


def test_an_ambiguous_out_takes_the_shortest_reading_and_still_lands_where_kvm_did() -> None:
    # E6 EE: "out 0xEE, al" (2 bytes) or "...E6; out dx, al" with DX = 0xEE (1 byte).
    pending = builder().build(
        capture(True, 1, 0xEE, regs(rdx=0xEE, rip=0x500), code_before=b"\xe6\xee", plain_out=True)
    )
    message = decode_message(pending.frame)
    assert (message.rip, message.instruction_length) == (0x4FF, 1)
    assert pending.kvm_after[0] == 0x500  # RIP after the completion is the same either way


def test_an_in_is_decoded_at_rip_and_its_completion_merges_rax() -> None:
    pending = builder().build(
        capture(False, 1, 0x3FD, regs(rax=0xAABB_CCDD, rdx=0x3FD, rip=0x7C20), code_at=b"\xec\xa8\x20")
    )
    message = decode_message(pending.frame)
    assert (message.rip, message.instruction_length, message.access_type) == (0x7C20, 1, AccessType.READ)
    completion = Completion(3, registers=Registers.RIP | Registers.RAX, rip=0x7C21, rax=0xAABB_CC60,
                            source_partition=7).to_bytes()  # fmt: skip
    action = plan_completion(pending, read_completion(completion), lambda p: b"")
    assert action.data == b"\x60" and action.registers is None and action.refused is None


def test_a_completion_kvm_cannot_reproduce_is_applied_register_by_register() -> None:
    pending = builder().build(capture(False, 2, 0x71, regs(rax=0xFFFF_0000, rip=0x10), code_at=b"\xe5\x71"))
    # The architecture keeps RAX[63:16] for a 16-bit IN: a completion that also changes bit 16 cannot come from
    # KVM's own merge, so the vCPU sets the registers itself.
    completion = Completion(3, registers=Registers.RIP | Registers.RAX, rip=0x12, rax=0xFFFE_1234,
                            source_partition=7).to_bytes()  # fmt: skip
    action = plan_completion(pending, read_completion(completion), lambda p: b"")
    assert action.data == b"\x34\x12"
    assert action.registers == (0x12, 0xFFFE_1234, 0, 0, 0)
    assert merge_in(0xFFFF_0000, 0x1234, 2) == 0xFFFF_1234


def test_rep_outs_reports_the_registers_from_before_its_element() -> None:
    # rep outsb at 7C30; KVM has already stepped RCX (3 -> 2) and RSI (0x9000 -> 0x9001) for this element.
    pending = builder().build(
        capture(
            True,
            1,
            0xE0,
            regs(rcx=2, rdx=0xE0, rsi=0x9001, rip=0x7C30, rflags=0x10002),
            code_at=b"\xf3\x6e\x90",
            code_before=b"\x90\x90",
            data=b"A",
        )
    )
    message = decode_message(pending.frame)
    assert (message.rip, message.instruction_length, message.access_info) == (0x7C30, 2, 0x19)
    assert (message.rcx, message.rsi) == (3, 0x9000)
    assert message.instruction_bytes[: message.instruction_byte_count] == b"\xf3\x6e\x90"
    assert pending.kvm_after == (0x7C30, 0, 2, 0x9001, 0)
    # The service moved all three elements: RCX 0, RSI 0x9003, RIP past the instruction.
    completion = Completion(3, registers=Registers.RIP | Registers.RCX | Registers.RSI, rip=0x7C32, rcx=0,
                            rsi=0x9003, source_partition=7).to_bytes()  # fmt: skip
    action = plan_completion(pending, read_completion(completion), lambda p: b"")
    assert action.data is None and action.registers == (0x7C32, 0, 0, 0x9003, 0)


def test_a_rep_ins_chunk_is_read_back_for_kvm_to_store() -> None:
    # rep insw at 0x40 in 32-bit code, RCX 0x100, RDI 0x2000; KVM reports a chunk of 0x80 words.
    pending = builder().build(
        capture(
            False,
            2,
            0x1F0,
            regs(rcx=0x100, rdx=0x1F0, rdi=0x2000, rip=0x40),
            context=PROTECTED,
            count=0x80,
            code_at=b"\xf3\x66\x6d",
        )
    )
    assert pending.kind is IoKind.INS and pending.chunk == 0x2000
    assert pending.kvm_after == (0x40, 0, 0x80, 0, 0x2100)
    chunk = bytes(range(256))
    partial = Completion(3, registers=Registers.RCX | Registers.RDI, rcx=0x80, rdi=0x2100,
                         source_partition=7).to_bytes()  # fmt: skip
    action = plan_completion(pending, read_completion(partial), lambda p: chunk)
    assert action.data == chunk and action.registers is None  # exactly what KVM does next
    done = Completion(3, registers=Registers.RIP | Registers.RCX | Registers.RDI, rip=0x43, rcx=0, rdi=0x2200,
                      source_partition=7).to_bytes()  # fmt: skip
    action = plan_completion(pending, read_completion(done), lambda p: chunk)
    assert action.registers == (0x43, 0, 0, 0, 0x2200)  # more than KVM's chunk: the service's word goes


def test_a_refused_string_access_stops_the_vp_with_the_status() -> None:
    pending = builder().build(
        capture(False, 1, 0x60, regs(rcx=4, rdx=0x60, rip=0x40), context=PROTECTED, count=4, code_at=b"\xf3\x6c")
    )
    refused = Completion(3, status=Status.MEMORY_ERROR, detail=1, source_partition=7).to_bytes()
    action = plan_completion(pending, read_completion(refused), lambda p: b"\0" * 4)
    assert action.refused is not None and "MEMORY_ERROR" in action.refused
    assert action.registers == (0x40, 0, 4, 0, 0)  # none named: as at the intercept


def test_code_that_is_not_the_reported_instruction_is_an_error() -> None:
    with pytest.raises(IoDecodeError, match="no IN of 1 bytes to port 0x60"):
        builder().build(capture(False, 1, 0x60, regs(rip=0x40), code_at=b"\x90\x90"))


def test_a_completion_reads_as_the_core_decodes_it() -> None:
    completion = Completion(3, Status.HANDLER_FAILED, Registers.RIP | Registers.RCX, rip=0x7C32, rcx=5,
                            source_partition=7, port_number=0x60, access_info=1, detail=9)  # fmt: skip
    assert read_completion(completion.to_bytes()) == completion == decode_completion(completion.to_bytes())
    assert type(read_completion(completion.to_bytes()).status) is Status


@pytest.mark.parametrize(
    ("frame", "error", "field"),
    [
        (bytes(72), UnknownMessageTypeError, "message_type"),
        (Completion(3, version=2).to_bytes(), FieldValueError, "version"),
        (Completion(3).to_bytes()[:40], ShortFrameError, "payload"),
        (Completion(3).to_bytes()[:21] + b"\x99" + Completion(3).to_bytes()[22:], FieldValueError, "status"),
    ],
    ids=["not a completion", "another version", "cut short", "unknown status"],
)
def test_a_frame_that_is_not_a_valid_completion_raises_the_cores_error(
    frame: bytes, error: type[FrameError], field: str
) -> None:
    with pytest.raises(error) as raised:
        read_completion(frame)
    assert raised.value.field == field


def test_the_backward_scan_skips_readings_the_decoder_refuses() -> None:
    # F0 E6 80: "lock out 0x80, al" is #UD and "80" no I/O instruction; "out 0x80, al" (2 bytes) is the one.
    pending = builder().build(capture(True, 1, 0x80, regs(rip=0x7C12), code_before=b"\xf0\xe6\x80", plain_out=True))
    message = decode_message(pending.frame)
    assert (message.rip, message.instruction_length) == (0x7C10, 2)


def test_a_rex_prefix_is_part_of_a_64_bit_out_but_the_shortest_reading_wins() -> None:
    # 48 EE in 64-bit code: "out dx, al" with or without REX.W (which does not widen port I/O).
    flat64 = SegmentRegister(0, 0xFFFF_FFFF, 0x08, SegmentAttributes(0xA09B))
    long_mode = CpuContext(flat64, FLAT_DS, FLAT_DS, FLAT_DS, FLAT_DS, FLAT_DS, cr0=0x8000_0011, efer=0x500, cpl=0)
    pending = builder().build(capture(True, 1, 0x80, regs(rdx=0x80, rip=0x1_0000_0002), context=long_mode,
                                      code_before=b"\x48\xee", plain_out=True))  # fmt: skip
    message = decode_message(pending.frame)
    assert (message.rip, message.instruction_length) == (0x1_0000_0001, 1)
    assert message.execution_state.efer_lma


@pytest.mark.parametrize(("segment", "expected"), [(0x64, 0x20000), (0x65, 0x30000), (0x3E, 0)], ids=["fs", "gs", "ds"])
def test_an_outs_is_told_from_its_segment_override_by_the_element_it_read(segment: int, expected: int) -> None:
    # 3E/64/65 6E: "outsb" with a DS, FS or GS override, or a bare "outsb" (DS) after some other byte. Only the
    # reading whose segment holds the reported element at RSI - 1 may stand.
    fs = SegmentRegister(0x20000, 0xFFFF, 0x20, SegmentAttributes(0x93))
    gs = SegmentRegister(0x30000, 0xFFFF, 0x28, SegmentAttributes(0x93))
    context = CpuContext(FLAT_CS, FLAT_DS, FLAT_DS, fs, gs, FLAT_DS, cr0=0x11, efer=0, cpl=0)
    memory = {expected + 0x500: b"Z"}
    out = FrameBuilder(vp_index=3, partition=7, out_rip_advanced=True,
                       read_linear=lambda address, n: memory.get(address, b"?"))  # fmt: skip
    pending = out.build(capture(True, 1, 0xE0, regs(rdx=0xE0, rsi=0x501, rip=0x7C12), context=context,
                                code_before=bytes([0x90, segment, 0x6E]), data=b"Z"))  # fmt: skip
    message = decode_message(pending.frame)
    length = 1 if segment == 0x3E else 2  # DS: the shortest reading, both read the same byte
    assert (message.rip, message.instruction_length, message.rsi) == (0x7C12 - length, length, 0x500)
    assert message.instruction_bytes[:length] == bytes([segment, 0x6E])[-length:]


def test_a_16_bit_address_size_wraps_the_outs_source_index() -> None:
    # 67 6E in 32-bit code: "outsb" with SI, not ESI. KVM stepped SI from 0xFFFF to 0 (bits 16 and up kept): the
    # element came from DS:FFFF, not from DS:1FFFF as a plain "outsb" (6E) with ESI would have read it.
    out = FrameBuilder(vp_index=3, partition=7, out_rip_advanced=True,
                       read_linear=lambda address, n: b"A" if address == 0xFFFF else b"?")  # fmt: skip
    pending = out.build(capture(True, 1, 0xE0, regs(rdx=0xE0, rsi=0x2_0000, rip=0x40), context=PROTECTED,
                                code_before=b"\x67\x6e", data=b"A"))  # fmt: skip
    message = decode_message(pending.frame)
    assert (message.rip, message.instruction_length, message.rsi) == (0x3E, 2, 0x2_FFFF)
