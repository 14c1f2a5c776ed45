"""String-op intercepts at the frame level, through the sans-I/O engine."""

from __future__ import annotations

from dataclasses import replace

import pytest
from string_driver import Vp, instruction

from dispatcher import (
    BufferMemory,
    Engine,
    Guest,
    Registers,
    Router,
    Status,
    Translate,
    decode_completion,
)

PORT = 0x1F0


def engine_with_memory(router: Router | None = None, translate: Translate | None = None) -> tuple[Engine, bytearray]:
    buffer = bytearray(0x1_0000)
    if router is None:
        router = Router()
        router.add(lambda access: 0x42, PORT, 4)
    return Engine(router, guest=Guest(BufferMemory([(0, buffer)]), translate), deadline=None), buffer


def frame(code: bytes, *, count: int | None = None, length: int | None = None) -> bytes:
    # A REP INSW intercept in protected mode (32-bit code) carrying these instruction bytes.
    message = Vp("protected", rcx=4, rdi=0x100).message(PORT, code[:15], outs=False, size=2, rep=True)
    return replace(
        message,
        instruction_bytes=code,
        instruction_byte_count=len(code) if count is None else count,
        instruction_length=len(code) if length is None else length,
    ).to_bytes()


REP_INSW = bytes([0x66, 0xF3, 0x6D])


@pytest.mark.parametrize(
    ("code", "count", "length", "offset"),
    [
        (REP_INSW, 0, 3, 59),  # InstructionByteCount 0: nothing to decode
        (REP_INSW, 2, 3, 72 + 2),  # the bytes end before the opcode
        (bytes([0x66, 0xF3, 0xEC]), None, None, 72 + 2),  # IN AL, DX is not string I/O
        (bytes([0xF0, 0x66, 0x6D]), None, None, 72),  # LOCK is #UD on INS
        (bytes([0x48, 0x66, 0x6D]), None, None, 72),  # REX does not exist outside 64-bit mode (DEC EAX)
        (bytes([0x66] * 15 + [0x6D]), 16, 15, 72 + 15),  # no opcode within 15 bytes
        (REP_INSW, None, 4, 20),  # InstructionLength contradicts the bytes
        (bytes([0xF3, 0x6D]), None, None, 58),  # INSD where AccessInfo says 2 bytes
        (bytes([0x66, 0x6D]), None, None, 58),  # no REP where AccessInfo says REP
        (bytes([0x66, 0xF3, 0x6F]), None, None, 21),  # OUTSW where the access type says read
    ],
)
def test_instruction_bytes_that_do_not_hold_this_string_access_are_a_protocol_error(
    code: bytes, count: int | None, length: int | None, offset: int
) -> None:
    engine, buffer = engine_with_memory()
    out, jobs = engine.receive([frame(code, count=count, length=length)])
    completion = decode_completion(out[0])
    assert not jobs and completion.status is Status.PROTOCOL_ERROR and completion.detail == offset
    assert completion.registers == Registers.NONE and completion.port_number == PORT
    assert engine.stats.protocol_errors == 1 and engine.stats.intercepts == 0 and not any(buffer)


def test_prefixes_in_any_order_and_repeated_decode_as_the_last_of_their_group() -> None:
    # 2E and 26 before 3E: the last override (DS) wins; REX is accepted in 64-bit mode.
    router = Router()
    sent: list[int] = []
    router.add(lambda access: sent.append(access.value), PORT, 4)
    engine, buffer = engine_with_memory(router, translate=lambda p, v, linear, w: linear)
    buffer[0x40] = 0x99
    vp = Vp("long", rsi=0x40)
    code = bytes([0x2E, 0x26, 0x3E, 0x48, 0x6E])
    out, _ = engine.receive([vp.message(PORT, code, outs=True, size=1, rep=False).to_bytes()])
    completion = decode_completion(out[0])
    assert completion.status is Status.COMPLETED and sent == [0x99]
    assert completion.registers == Registers.RIP | Registers.RSI and completion.rsi == 0x41
    assert completion.rip == 0x1000 + 5


def test_the_deadline_covers_a_whole_synchronous_chunk() -> None:
    # Each element takes 0.3 s of a fake clock: four make 1.2 s, past the 1 s deadline.
    now = [0.0]

    def slow(access: object) -> int:
        now[0] += 0.3
        return 0x42

    router = Router()
    router.add(slow, PORT, 4)
    memory = BufferMemory([(0, bytearray(0x1000))])
    engine = Engine(router, guest=Guest(memory), deadline=1.0, clock=lambda: now[0])
    code = instruction("protected", outs=False, size=4, rep=True, address_size=32, segment=None)
    message = Vp("protected", rcx=4, rdi=0x100).message(PORT, code, outs=False, size=4, rep=True)
    out, _ = engine.receive([message.to_bytes()])
    completion = decode_completion(out[0])
    # The chunk ran (a synchronous handler cannot be interrupted) but its result is discarded: all ones.
    assert completion.status is Status.DEADLINE_EXCEEDED and engine.stats.deadline_exceeded == 1
    assert memory.read(0x100, 16) == b"\xff" * 16
    assert completion.registers & Registers.RIP and completion.rdi == 0x110 and completion.rcx == 0


def test_statistics_count_string_intercepts_and_their_failures() -> None:
    engine, _ = engine_with_memory()
    vp = Vp("protected", rcx=2, rdi=0x100)
    code = instruction("protected", outs=False, size=4, rep=True, address_size=32, segment=None)
    good = vp.message(PORT, code, outs=False, size=4, rep=True).to_bytes()
    outside = Vp("protected", rcx=2, rdi=0x10_0000).message(PORT, code, outs=False, size=4, rep=True).to_bytes()
    engine.receive([good, outside])
    stats = engine.stats
    assert stats.intercepts == 2 and stats.memory_errors == 1 and stats.completed == 1


def test_max_elements_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_elements"):
        Engine(Router(), max_elements=0)


def test_a_bulk_chunk_past_the_deadline_reads_all_ones() -> None:
    now = [0.0]

    def slow_chunk(access: object) -> bytes:
        now[0] += 2.0
        return b"\x42" * 16

    router = Router()
    router.add(lambda access: 0, PORT, 4)
    router.add_bulk(slow_chunk, PORT)
    memory = BufferMemory([(0, bytearray(0x1000))])
    engine = Engine(router, guest=Guest(memory), deadline=1.0, clock=lambda: now[0])
    code = instruction("protected", outs=False, size=4, rep=True, address_size=32, segment=None)
    message = Vp("protected", rcx=4, rdi=0x100).message(PORT, code, outs=False, size=4, rep=True)
    completion = decode_completion(engine.receive([message.to_bytes()])[0][0])
    assert completion.status is Status.DEADLINE_EXCEEDED and memory.read(0x100, 16) == b"\xff" * 16
