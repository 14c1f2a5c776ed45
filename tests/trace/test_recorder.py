"""The Recorder: what a FakePartition's devices are asked, answered and moved by, in the order it ran."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher import (
    BufferMemory,
    Dispatcher,
    PortAccess,
    Router,
    decode_completion,
    decode_message,
)
from dispatcher.clock import VirtualClock
from dispatcher.recorder import Recorder
from dispatcher.replay import replay
from dispatcher.trace import TraceWriter, new_metadata, read_trace
from dispatcher.trace_records import (
    Acknowledge,
    ClockAdvance,
    Completion,
    Intercept,
    IrqEdge,
    MemoryRead,
    MemoryWrite,
    TraceEvent,
)
from examples.pc_devices import build_pc
from transports.testing import FakePartition

pytestmark = pytest.mark.anyio

# Mode 2 with count 1000: the count loads one PIT clock after the write, so OUT falls after 1001 ticks at
# 1193182 Hz (838933.4 ns), and the clock polls at the first whole ns past that.
FIRST_IRQ0_NS = 838_934


def pairs(events: list[TraceEvent]) -> Iterator[tuple[Intercept, Completion]]:
    """Each intercept with the completion that follows it (one VP: nothing in between but memory events)."""
    pending: Intercept | None = None
    for event in events:
        if isinstance(event, Intercept):
            assert pending is None, "an intercept without its completion"
            pending = event
        elif isinstance(event, Completion):
            assert pending is not None, "a completion without an intercept"
            yield pending, event
            pending = None
    assert pending is None


async def test_a_pc_on_a_virtual_clock(tmp_path: Path) -> None:
    path = tmp_path / "pc.trace"
    clock = VirtualClock()
    pc = build_pc(clock=clock)
    recorder = Recorder(TraceWriter(path, new_metadata("api", machine="examples.pc_devices:build_pc")), clock=clock)
    recorder.tap(pc.pit.irq)
    clock.watch(recorder.timed(pc))
    interrupts = recorder.interrupts(pc.pic)
    async with FakePartition(pc.router, dispatcher=Dispatcher(pc.router, observer=recorder), clock=clock) as partition:
        vp = partition.vp(0)
        for port, value in ((0x20, 0x11), (0x21, 0x08), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFE)):
            await vp.outb(port, value)  # the master PIC: vectors from 0x08, only IRQ 0 unmasked
        await vp.outb(0x43, 0x34)  # PIT channel 0, lobyte/hibyte, mode 2
        await vp.outb(0x40, 1000 & 0xFF)
        await vp.outb(0x40, 1000 >> 8)
        partition.advance(1_000_000)
        with partition.dispatcher.lock:
            vector = interrupts.acknowledge()
        assert await vp.inb(0x3FD) & 0x60 == 0x60  # the UART's transmitter is empty
    recorder.close()

    assert vector == 0x08
    trace = read_trace(path)
    assert trace.complete and trace.metadata["machine"] == "examples.pc_devices:build_pc"
    events = trace.events
    exchanged = list(pairs(events))
    assert [decode_message(i.frame).port_number for i, _ in exchanged] == [
        0x20,
        0x21,
        0x21,
        0x21,
        0x21,
        0x43,
        0x40,
        0x40,
        0x3FD,
    ]
    assert decode_completion(exchanged[-1][1].frame).rax & 0x60 == 0x60
    # The intercepts came while the clock stood at 0; the last one after the advance.
    assert {i.virtual_ns for i, _ in exchanged[:-1]} == {0}
    assert exchanged[-1][0].virtual_ns == 1_000_000
    # The PC was polled at the PIT's deadlines; IRQ 0 rose at the first (its edges recorded as they happened).
    advances = [e.virtual_ns for e in events if isinstance(e, ClockAdvance)]
    assert advances == [FIRST_IRQ0_NS]
    edges = [e for e in events if isinstance(e, IrqEdge)]
    assert edges and edges[0].line == 0
    assert all(edge.virtual_ns in advances for edge in edges)
    acknowledges = [e for e in events if isinstance(e, Acknowledge)]
    assert [(a.virtual_ns, a.vector) for a in acknowledges] == [(1_000_000, 0x08)]
    # Everything in time order.
    times = [e.virtual_ns for e in events]
    assert times == sorted(times)


def fifo_router(taken: bytearray) -> Router:
    """A data port that reads 11 22 33 44 and keeps what is written to it in ``taken``."""
    router = Router()
    fifo = bytearray(b"\x11\x22\x33\x44")

    @router.claim(0x1F0)
    def data(access: PortAccess) -> int | None:
        if access.is_write:
            taken.append(access.value)
            return None
        return fifo.pop(0)

    return router


async def test_string_io_records_guest_memory(tmp_path: Path) -> None:
    path = tmp_path / "string.trace"
    taken = bytearray()
    router = fifo_router(taken)
    memory = BufferMemory([(0, bytearray(0x1000))])
    memory.write(0x200, b"\xaa\xbb")
    recorder = Recorder(TraceWriter(path, new_metadata("api")))
    async with FakePartition(router, memory=memory, record=recorder) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx = 0x100, 4
        await vp.insb(0x1F0, rep=True)
        vp.rsi, vp.rcx = 0x200, 2
        await vp.outsb(0x1F0, rep=True)
    recorder.close()

    assert memory.read(0x100, 4) == b"\x11\x22\x33\x44" and taken == b"\xaa\xbb"
    events = read_trace(path).events
    written = b"".join(e.data for e in events if isinstance(e, MemoryWrite))
    read = b"".join(e.data for e in events if isinstance(e, MemoryRead))
    assert written == b"\x11\x22\x33\x44" and read == b"\xaa\xbb"
    assert min(e.address for e in events if isinstance(e, MemoryWrite)) == 0x100
    # Each memory event comes after its intercept and before its completion.
    kinds = [type(e).__name__ for e in events]
    first = kinds.index("MemoryWrite")
    assert kinds[first - 1] == "Intercept" and "Completion" in kinds[first:]
    # Replayed against a fresh device: the OUTS's bytes come from the trace, the INS's are compared.
    replayed_taken = bytearray()
    result = replay(events, fifo_router(replayed_taken))
    assert result.summary == "replayed 2 intercepts, 0 differ"
    assert replayed_taken == b"\xaa\xbb"


def test_a_partition_given_a_dispatcher_takes_the_recorder_there(tmp_path: Path) -> None:
    recorder = Recorder(TraceWriter(tmp_path / "t.trace", new_metadata("api")))
    router = Router()
    with pytest.raises(ValueError, match="give the recorder to the Dispatcher you pass"):
        FakePartition(router, dispatcher=Dispatcher(router), record=recorder)
    recorder.close()


class FakeHostClock:
    def __init__(self) -> None:
        self.ns = 5_000

    def __call__(self) -> int:
        return self.ns


def test_following_real_time_moves_the_clock_at_each_intercept(tmp_path: Path) -> None:
    host = FakeHostClock()
    clock = VirtualClock()
    path = tmp_path / "t.trace"
    recorder = Recorder(TraceWriter(path, new_metadata("api")), clock=clock, follow_real_time=True, real_clock=host)
    host.ns += 2_000
    recorder.intercept(b"first")
    assert clock.now_ns == 2_000
    clock.advance(10_000)  # the machine moved its clock ahead of the host: never taken back
    host.ns += 1_000
    recorder.intercept(b"second")
    assert clock.now_ns == 12_000
    recorder.clock_advanced()
    recorder.close()
    assert read_trace(path).events == [
        Intercept(2_000, 2_000, b"first"),
        Intercept(12_000, 3_000, b"second"),
        ClockAdvance(12_000, 3_000),
    ]


def test_without_a_clock_virtual_time_is_the_hosts(tmp_path: Path) -> None:
    host = FakeHostClock()
    path = tmp_path / "t.trace"
    recorder = Recorder(TraceWriter(path, new_metadata("api", clock="real")), real_clock=host)
    host.ns += 700
    recorder.completion(b"done")
    recorder.acknowledged(None)
    recorder.close()
    assert read_trace(path).events == [Completion(700, 700, b"done"), Acknowledge(700, 700, None)]


def test_a_clock_in_seconds_is_read_in_ns(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    recorder = Recorder(TraceWriter(path, new_metadata("api")), clock=lambda: 1.5)
    recorder.set_irq(4, True)
    recorder.close()
    assert [(e.virtual_ns, e.line, e.level) for e in read_trace(path).events if isinstance(e, IrqEdge)] == [
        (1_500_000_000, 4, True)
    ]


def test_following_real_time_needs_a_virtual_clock(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.trace", new_metadata("api"))
    with pytest.raises(ValueError, match="follow_real_time needs"):
        Recorder(writer, clock=lambda: 0.0, follow_real_time=True)
    writer.close()
