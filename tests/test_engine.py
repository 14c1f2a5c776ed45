"""The sans-I/O engine: completions computed from frames, without any event loop."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher import (
    AccessInfo,
    AccessType,
    Completion,
    Engine,
    ExecutionState,
    IoPortInterceptMessage,
    PortAccess,
    Registers,
    Router,
    SegmentAttributes,
    SegmentRegister,
    Status,
    decode_completion,
    decode_message,
)
from dispatcher.wire import Offset


def message(port: int, size: int = 1, *, write: bool = False, rax: int = 0, vp: int = 0) -> IoPortInterceptMessage:
    return IoPortInterceptMessage(
        port_number=port,
        access_type=AccessType.WRITE if write else AccessType.READ,
        access_info=AccessInfo.build(size),
        rax=rax,
        vp_index=vp,
    )


def frame(port: int, size: int = 1, *, write: bool = False, rax: int = 0, vp: int = 0) -> bytes:
    return message(port, size, write=write, rax=rax, vp=vp).to_bytes()


def run(engine: Engine, *frames: bytes) -> list[Completion]:
    out, jobs = engine.receive(frames)
    assert jobs == []
    return [decode_completion(f) for f in out]


def reference_in_merge(rax: int, size: int, value: int) -> int:
    """IN as the SDM describes it, written independently of the engine."""
    if size == 4:
        return value & 0xFFFF_FFFF
    low_bits = 8 * size
    return (rax >> low_bits << low_bits) | (value & ((1 << low_bits) - 1))


@given(rax=st.integers(0, 2**64 - 1), size=st.sampled_from([1, 2, 4]), value=st.integers(0, 2**64 - 1))
def test_in_merges_rax_like_the_architecture(rax: int, size: int, value: int) -> None:
    router = Router()
    router.add(lambda access: value, 0x100, 4)
    [completion] = run(Engine(router), frame(0x100, size, rax=rax))
    assert completion.registers == Registers.RIP | Registers.RAX
    assert completion.rax == reference_in_merge(rax, size, value)


@given(rax=st.integers(0, 2**64 - 1), size=st.sampled_from([1, 2, 4]))
def test_out_gives_the_handler_the_low_bytes_of_rax(rax: int, size: int) -> None:
    seen: list[PortAccess] = []
    router = Router()
    router.add(seen.append, 0x100, 4)
    [completion] = run(Engine(router), frame(0x100, size, write=True, rax=rax))
    assert seen[0].value == rax & ((1 << 8 * size) - 1) and seen[0].size == size and seen[0].is_write
    assert completion.registers == Registers.RIP


@pytest.mark.parametrize(
    ("state", "cs_attributes", "rip", "expected"),
    [
        (ExecutionState.build(), 0x009B, 0xFFFF, 0x0001),  # real mode: IP wraps at 64 KiB
        (ExecutionState.build(cr0_pe=True), 0xC09B, 0xFFFF_FFFF, 0x0000_0001),  # 32-bit code
        (ExecutionState.build(cr0_pe=True), 0x009B, 0x1_FFFF, 0x0001),  # 16-bit protected-mode code
        (ExecutionState.build(cr0_pe=True, efer_lma=True), 0xA09B, 0xFFFF_FFFF, 0x1_0000_0001),  # 64-bit code
        (ExecutionState.build(cr0_pe=True, efer_lma=True), 0xC09B, 0xFFFF_FFFF, 0x0000_0001),  # compatibility mode
    ],
)
def test_rip_advances_by_instruction_length_within_the_code_size(
    state: ExecutionState, cs_attributes: int, rip: int, expected: int
) -> None:
    router = Router()
    router.add(lambda access: None, 0x80, access="w")
    cs = SegmentRegister(attributes=SegmentAttributes(cs_attributes))
    [completion] = run(
        Engine(router),
        replace(
            message(0x80, write=True), rip=rip, instruction_length=2, execution_state=state, cs_segment=cs
        ).to_bytes(),
    )
    assert completion.rip == expected


def test_unclaimed_reads_are_all_ones_and_writes_are_dropped_and_counted() -> None:
    engine = Engine(Router())
    read, write = run(engine, frame(0x2F8, 2, rax=0xAAAA_0000), frame(0x2F8, write=True))
    assert read.status is Status.COMPLETED and read.rax == 0xAAAA_FFFF
    assert write.status is Status.COMPLETED and write.registers == Registers.RIP
    assert (engine.stats.unclaimed_reads, engine.stats.unclaimed_writes) == (1, 1)


def test_an_access_straddling_claims_is_split_into_bytes_combined_little_endian() -> None:
    router = Router()
    calls: list[tuple[int, int]] = []

    def low(access: PortAccess) -> int:
        calls.append((access.port, access.size))
        return 0x11

    def high(access: PortAccess) -> int:
        calls.append((access.port, access.size))
        return 0x22

    router.add(low, 0x100)
    router.add(high, 0x101)
    [completion] = run(Engine(router), frame(0x100, 4))
    assert calls == [(0x100, 1), (0x101, 1)]
    assert completion.rax == 0xFFFF_2211  # ports 0x102 and 0x103 are unclaimed


def test_a_write_wider_than_max_size_arrives_as_bytes() -> None:
    router = Router()
    seen: list[tuple[int, int, int]] = []
    router.add(lambda a: seen.append((a.port, a.size, a.value)), 0x3F8, 8, max_size=1)
    run(Engine(router), frame(0x3F9, 2, write=True, rax=0xBEEF))
    assert seen == [(0x3F9, 1, 0xEF), (0x3FA, 1, 0xBE)]


def test_an_access_partly_past_its_claim_is_split() -> None:
    router = Router()
    router.add(lambda a: 0x5A, 0xFFFE, 2)
    [completion] = run(Engine(router), frame(0xFFFF, 4, rax=0))
    assert completion.rax == 0xFFFF_FF5A  # ports past 0xFFFF are never claimed


def test_a_failing_handler_gives_exactly_one_completion_with_all_ones(caplog: pytest.LogCaptureFixture) -> None:
    router = Router()

    def broken(access: PortAccess) -> int:
        raise RuntimeError("device on fire")

    router.add(broken, 0x64)
    router.add(lambda a: 7, 0x60)
    engine = Engine(router)
    with caplog.at_level(logging.ERROR, logger="intercept_dispatch"):
        failed, written, fine = run(
            engine, frame(0x64, rax=0x1200, vp=1), frame(0x64, write=True, vp=2), frame(0x60, vp=3)
        )
    assert (failed.vp_index, failed.status, failed.rax) == (1, Status.HANDLER_FAILED, 0x12FF)
    assert (written.vp_index, written.status, written.registers) == (2, Status.HANDLER_FAILED, Registers.RIP)
    assert (fine.vp_index, fine.status, fine.rax) == (3, Status.COMPLETED, 7)
    assert "port 0x64" in caplog.text and "VP 1" in caplog.text and "device on fire" in caplog.text
    assert engine.stats.handler_failed == 2


def test_a_read_handler_returning_none_is_a_handler_failure() -> None:
    router = Router()
    router.add(lambda a: None, 0x61)
    [completion] = run(Engine(router), frame(0x61))
    assert completion.status is Status.HANDLER_FAILED and completion.rax == 0xFF


def test_a_synchronous_handler_past_its_deadline_has_its_result_discarded() -> None:
    ticks = itertools.count(0, 5)  # every clock read is 5 s later than the last
    router = Router()
    router.add(lambda a: 0x42, 0x70)
    engine = Engine(router, deadline=1.0, clock=lambda: float(next(ticks)))
    [completion] = run(engine, frame(0x70))
    assert completion.status is Status.DEADLINE_EXCEEDED and completion.rax == 0xFF
    assert engine.stats.deadline_exceeded == 1


@pytest.mark.parametrize(
    ("mutate", "offset"),
    [
        (lambda f: f[:50], 50),
        (lambda f: f[:4] + b"\xff" + f[5:], 4),
        (lambda f: f[:21] + b"\x02" + f[22:], 21),
        (lambda f: f[:58] + b"\x05" + f[59:], 58),
    ],
)
def test_a_malformed_frame_gets_a_protocol_error_naming_the_offset(
    mutate: Callable[[bytes], bytes], offset: int
) -> None:
    engine = Engine(Router())
    bad = mutate(frame(0x60, vp=9))
    completion, next_one = run(engine, bad, frame(0x60, vp=10))
    assert next_one.vp_index == 10 and next_one.status is Status.COMPLETED  # the stream goes on
    assert completion.status is Status.PROTOCOL_ERROR and completion.detail == offset
    assert completion.vp_index == 9 and completion.registers == Registers.NONE
    assert engine.stats.protocol_errors == 1 and engine.stats.intercepts == 1


def test_a_string_access_without_guest_memory_is_unsupported_when_not_handled() -> None:
    # String I/O needs guest memory; an engine built without it must say so, not guess.
    message = IoPortInterceptMessage(
        port_number=0x1F0, access_info=AccessInfo.build(2, string_op=True), instruction_bytes=b"\x6d", rax=0, rip=0x100
    )
    out, _ = Engine(Router()).receive([message.to_bytes()])
    completion = decode_completion(out[0])
    assert completion.status in (Status.UNSUPPORTED, Status.MEMORY_ERROR)
    assert not completion.registers & Registers.RIP


frames_strategy = st.lists(
    st.tuples(
        st.integers(0x0FE, 0x106),
        st.sampled_from([1, 2, 4]),
        st.booleans(),
        st.integers(0, 2**64 - 1),
        st.integers(0, 3),
    ),
    max_size=20,
)


@given(frames_strategy)
def test_inline_fast_path_matches_the_general_path(accesses: list[tuple[int, int, bool, int, int]]) -> None:
    """Both paths of the engine must produce identical completions for the same frames."""

    def make_router() -> Router:
        router = Router()
        state = {"latch": 0}

        def latch(access: PortAccess) -> int | None:
            if access.is_write:
                state["latch"] = access.value
                return None
            return state["latch"] + access.offset

        router.add(latch, 0x100, 4)
        router.add(lambda a: 0xAB, 0x104, access="r")
        router.add(lambda a: 0xCD, 0x105, 2, max_size=1)
        return router

    frames = [frame(p, s, write=w, rax=r, vp=v) for p, s, w, r, v in accesses]
    fast, _ = Engine(make_router()).receive(frames)
    general, _ = Engine(make_router(), inline=False).receive(frames)
    assert fast == general


def test_async_intercepts_queued_behind_an_async_job_all_complete_in_order() -> None:
    # Each finish() hands back the VP's next job while the rest of its queue keeps waiting behind it.
    router = Router()

    async def read(access: PortAccess) -> int:
        return access.port

    router.add(read, 0x100, 4)
    engine = Engine(router, deadline=None)
    out, jobs = engine.receive([frame(0x100 + i) for i in range(4)])
    assert not out and len(jobs) == 1
    completions: list[int] = []
    while jobs:
        (job,) = jobs
        more, jobs = engine.finish(job, [job.steps[0].access.port])
        completions += [decode_completion(c).rax & 0xFF for c in more]
    assert completions == [0x00, 0x01, 0x02, 0x03]
    assert not engine.busy


def test_queued_counts_the_frames_waiting_behind_busy_vps() -> None:
    router = Router()

    async def read(access: PortAccess) -> int:
        return 1

    router.add(read, 0x100)
    router.add(lambda access: 2, 0x200)
    engine = Engine(router, deadline=None)
    out, jobs = engine.receive([frame(0x100), frame(0x200), frame(0x200), frame(0x200, vp=1)])
    assert engine.queued == 2 and len(out) == 1 and len(jobs) == 1  # VP 1 is not behind VP 0
    more, next_jobs = engine.finish(jobs[0], [1])
    assert engine.queued == 0 and len(more) == 3 and not next_jobs


@pytest.mark.parametrize("inline", [True, False])
def test_frames_of_another_partition_are_refused_before_any_device(
    inline: bool, caplog: pytest.LogCaptureFixture
) -> None:
    router = Router()
    seen: list[int] = []

    def record(access: PortAccess) -> int:
        seen.append(access.partition)
        return 0

    router.add(record, 0x60)
    engine = Engine(router, partition=3, inline=inline)
    frames = [replace(message(0x60), source_partition=p).to_bytes() for p in (3, 4)]
    with caplog.at_level(logging.WARNING, logger="intercept_dispatch.engine"):
        completions = run(engine, *frames)
    assert seen == [3]
    assert [(c.source_partition, c.status) for c in completions] == [(3, Status.COMPLETED), (4, Status.PROTOCOL_ERROR)]
    assert completions[1].detail == Offset.PARTITION
    assert "frame for partition 4 on VM 3's connection" in caplog.text
    assert engine.stats.protocol_errors == 1


def test_any_partition_is_served_without_one_named() -> None:
    router = Router()
    router.add(lambda access: access.partition, 0x60)
    frames = [replace(message(0x60), source_partition=p).to_bytes() for p in (3, 4)]
    assert [c.rax & 0xFF for c in run(Engine(router), *frames)] == [3, 4]


def test_an_abandoned_intercept_completes_as_a_dead_device_past_its_deadline() -> None:
    router = Router()
    router.add(lambda access: 0x12, 0x60)
    engine = Engine(router)
    (completion,) = [decode_completion(engine.abandoned(frame(0x60, 2, rax=0xAAAA_0000)))]
    assert completion.status is Status.DEADLINE_EXCEEDED
    assert completion.rax == 0xAAAA_FFFF and completion.registers == Registers.RIP | Registers.RAX
    assert engine.stats.deadline_exceeded == 1


class _Log:
    """An observer that lists what it sees."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def intercept(self, frame: bytes) -> None:
        self.seen.append(("intercept", decode_message(frame).port_number))

    def completion(self, frame: bytes) -> None:
        self.seen.append(("completion", decode_completion(frame).rax & 0xFF))


def test_an_observer_sees_each_intercept_before_its_handler_and_each_completion_as_made() -> None:
    router = Router()

    def read(access: PortAccess) -> int:
        log.seen.append(("handler", access.port))
        return 0x40 + access.port - 0x60

    router.add(read, 0x60, 2)
    log = _Log()
    engine = Engine(router, observer=log)
    out, _ = engine.receive([frame(0x60), frame(0x61), frame(0x1234)])
    assert [decode_completion(c).rax & 0xFF for c in out] == [0x40, 0x41, 0xFF]
    assert log.seen == [
        ("intercept", 0x60), ("handler", 0x60), ("completion", 0x40),
        ("intercept", 0x61), ("handler", 0x61), ("completion", 0x41),
        ("intercept", 0x1234), ("completion", 0xFF),
    ]  # fmt: skip


def test_an_observer_sees_the_completions_of_async_jobs_and_abandoned_intercepts() -> None:
    router = Router()

    async def read(access: PortAccess) -> int:
        return access.port & 0xFF

    router.add(read, 0x100, 2)
    log = _Log()
    engine = Engine(router, deadline=None, observer=log)
    out, jobs = engine.receive([frame(0x100), frame(0x101)])
    assert not out
    while jobs:
        (job,) = jobs
        _, jobs = engine.finish(job, [job.steps[0].access.port & 0xFF])
    engine.abandoned(frame(0x100))
    assert log.seen == [
        ("intercept", 0x100),
        ("intercept", 0x101),
        ("completion", 0x00),
        ("completion", 0x01),
        ("completion", 0xFF),
    ]


@given(frames_strategy)
def test_a_decoded_answer_matches_the_frame_s_completion(accesses: list[tuple[int, int, bool, int, int]]) -> None:
    """Engine.answer_port gives what receive gives the same intercept as a frame, or None before any handler ran."""

    def make_router(calls: list[int]) -> Router:
        router = Router()

        def read(access: PortAccess) -> int | None:
            calls.append(access.port)
            if access.port == 0x103:
                raise RuntimeError("broken register")
            return None if access.port == 0x102 else 0x1234_5678_9ABC + access.offset  # None: not a value

        router.add(read, 0x100, 4)
        router.add(lambda a: 0xCD, 0x105, 2, max_size=1)
        return router

    decoded_calls: list[int] = []
    framed_calls: list[int] = []
    decoded, framed = Engine(make_router(decoded_calls)), Engine(make_router(framed_calls))
    for port, size, write, rax, vp in accesses:
        message_ = message(port, size, write=write, rax=rax, vp=vp)
        (completion,), _ = framed.receive([message_.to_bytes()])
        next_rip = decode_completion(completion).rip
        before = len(decoded_calls)
        got = decoded.answer_port(0, vp, port, size, write, rax, next_rip)
        if got is None:
            assert len(decoded_calls) == before  # nothing ran
            (completion,), _ = decoded.receive([message_.to_bytes()])
            continue
        if isinstance(got, bytes):
            assert got == completion
            continue
        expected = decode_completion(completion)
        assert expected.status is Status.COMPLETED and expected.rip == next_rip
        if not write:
            assert reference_in_merge(rax, size, got) == expected.rax
    assert decoded_calls == framed_calls
    assert decoded.stats.port_counts == framed.stats.port_counts


def test_a_decoded_answer_is_declined_while_an_observer_wants_frames() -> None:
    router = Router()
    router.add(lambda a: 7, 0x60)
    assert Engine(router).answer_port(0, 0, 0x60, 1, False, 0, 1) == 7
    assert Engine(router, observer=_Log()).answer_port(0, 0, 0x60, 1, False, 0, 1) is None
    assert Engine(router, partition=3).answer_port(0, 0, 0x60, 1, False, 0, 1) is None


def test_on_failure_hears_each_failed_access_in_place_of_the_log(caplog: pytest.LogCaptureFixture) -> None:
    router = Router()
    broken = ValueError("a broken register")

    def fail(access: PortAccess) -> int:
        raise broken

    router.add(fail, 0x60)
    heard: list[tuple[Status, BaseException | None]] = []
    engine = Engine(router, on_failure=lambda status, error: heard.append((status, error)))
    with caplog.at_level(logging.ERROR, logger="intercept_dispatch.engine"):
        [completion] = run(engine, frame(0x60))
    assert completion.status is Status.HANDLER_FAILED and completion.rax & 0xFF == 0xFF
    assert heard == [(Status.HANDLER_FAILED, broken)]
    assert engine.stats.handler_failed == 1
    assert not caplog.records  # told, not logged
