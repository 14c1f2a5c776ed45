"""Replay: exact repeats, divergences with their context, bad traces, memory and interrupt comparison."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from buggy_devices import sequenced
from recording import Ack, Advance, port_frame, record, string_frame

from dispatcher import BufferMemory, IrqLine, IrqRecorder, PortAccess, Router, on_port
from dispatcher.allow import parse_allow
from dispatcher.clock import VirtualClock
from dispatcher.replay import ReplayError, format_divergence, replay
from dispatcher.trace_records import Acknowledge, ClockAdvance, Intercept, IrqEdge, MemoryRead, TraceEvent
from examples.pc_devices import build_pc

START = datetime(2024, 1, 1, tzinfo=UTC)  # the RTC's time at power-on, the same in recording and replay


def bios_like_steps(count: int, seed: int = 1) -> list[bytes | Advance | Ack]:
    """Accesses a BIOS makes (PIT, RTC/CMOS, UART, PCI, POST codes), with timer polls and acknowledges."""
    rng = random.Random(seed)
    steps: list[bytes | Advance | Ack] = [
        port_frame(0x43, write=True, value=0x34),  # PIT channel 0, mode 2
        port_frame(0x40, write=True, value=0x00),
        port_frame(0x40, write=True, value=0x10),
        port_frame(0x21, write=True, value=0xFE),  # the master PIC lets IRQ 0 through
    ]
    choices = [
        lambda: port_frame(0x70, write=True, value=rng.randrange(0x40)),
        lambda: port_frame(0x71),
        lambda: port_frame(0x40),
        lambda: port_frame(0x61),
        lambda: port_frame(0x3FD),
        lambda: port_frame(0x80, write=True, value=rng.randrange(256)),
        lambda: port_frame(0xCF8, 4, write=True, value=0x8000_0000 | rng.randrange(0, 0x100, 4)),
        lambda: port_frame(0xCFC, 4),
    ]
    for i in range(count):
        steps.append(rng.choice(choices)())
        if i % 40 == 39:
            steps.append(Advance((len(steps) + 1) * 1000))
            steps.append(Ack())
    return steps


def recorded_pc(count: int = 400) -> list[TraceEvent]:
    clock = VirtualClock()
    pc = build_pc(clock=clock, start_time=START)
    return record(pc, bios_like_steps(count), clock=clock)


def test_a_recording_replays_exactly() -> None:
    events = recorded_pc()
    clock = VirtualClock()
    result = replay(events, build_pc(clock=clock, start_time=START), clock=clock)
    intercepts = sum(type(e) is Intercept for e in events)
    assert result.summary == f"replayed {intercepts} intercepts, 0 differ"
    assert result.ok and result.not_compared == 0 and not result.failures
    assert any(type(e) is ClockAdvance for e in events)


def test_a_changed_device_diverges_with_context() -> None:
    events = recorded_pc()
    clock = VirtualClock()
    pc = build_pc(clock=clock, start_time=START)

    # A CMOS that reads 0x42 whatever is asked: IN 0x71 differs in RAX and nothing else.
    def cmos(access: PortAccess) -> int | None:
        return None if access.is_write else 0x42

    rtc = next(claim for claim in pc.router.claims if claim.first <= 0x71 <= claim.last)
    pc.router.remove(rtc)
    pc.router.claim(rtc.first, rtc.last - rtc.first + 1)(cmos)
    machine = pc
    result = replay(events, machine, clock=clock, context=3)
    assert not result.ok
    first = result.differences[0]
    assert first.kind == "completion" and first.port == 0x71 and first.fields == ("rax",)
    assert len(first.context) == 4 and first.context[-1][0] == first.index
    text = format_divergence(first)
    assert "completion of IN 0x71 (1 byte) differs (rax)" in text
    assert "rax=0x42" in text.splitlines()[2]  # got
    assert text.count("\n") >= 6


def test_allowed_differences_do_not_fail() -> None:
    events = record(sequenced(fixed=True), [port_frame(0x513, write=True, value=7), port_frame(0x513)])

    def other() -> Router:
        router = Router()
        router.claim(0x510, 4)(lambda access: None if access.is_write else 0x0F)
        return router

    assert not replay(events, other()).ok
    allow = parse_allow('[[allow]]\nports = "0x513"\ndirection = "in"\nmask = 0x0f\nreason = "scratch is scratch"\n')
    result = replay(events, other(), allow=allow)
    assert result.ok and len(result.allowed) == 1
    assert result.allowed[0].allowed == "scratch is scratch"
    narrower = parse_allow('[[allow]]\nports = "0x513"\nmask = 0x03\nreason = "only two bits"\n')
    assert not replay(events, other(), allow=narrower).ok


def test_an_index_entry_follows_the_writes_to_its_index_port() -> None:
    def cmos(value: int) -> Router:
        router = Router()
        router.claim(0x70, 2)(lambda access: None if access.is_write else value)
        return router

    memory = BufferMemory([(0, bytearray(0x10000))])
    memory.write(0x2000, b"\x0b")
    steps = [
        port_frame(0x71),  # no index written yet
        port_frame(0x70, write=True, value=0x8C),  # register C, NMI disabled (the index mask drops bit 7)
        port_frame(0x71),
        port_frame(0x70, write=True, value=0x0B),
        port_frame(0x71),
        port_frame(0x70, write=True, value=0x0C),
        string_frame(0x70, outs=True, count=1, address=0x2000),  # writes 0x0B, from guest memory: unknown
        port_frame(0x71),
        port_frame(0x70, write=True, value=0x0C),
        port_frame(0x71),
        port_frame(0x70, write=True, value=0x0B, vp=1),  # VP 1 moves the index before VP 0's read completes
    ]
    events = record(cmos(0x10), steps, memory=memory)
    # VP 0's last read is answered after VP 1's write: the read still saw register C.
    read, read_done, write, write_done = events[-4:]
    events[-4:] = [read, write, write_done, read_done]
    allow = parse_allow(
        '[[allow]]\nports = "0x71"\nindex = { port = "0x70", mask = 0x7f, values = ["0x0c"] }\nreason = "PF"\n'
    )
    result = replay(events, cmos(0x11), allow=allow)
    reads = sorted(result.differences + result.allowed, key=lambda divergence: divergence.index)
    assert [(d.port, d.allowed) for d in reads] == [
        (0x71, None),
        (0x71, "PF"),
        (0x71, None),
        (0x71, None),
        (0x71, "PF"),
    ]


def test_handler_failures_are_named() -> None:
    steps = [port_frame(0x510, write=True, value=0x5A), port_frame(0x511, write=True, value=0xA5), port_frame(0x512)]
    events = record(sequenced(fixed=True), steps)
    result = replay(events, sequenced())
    assert [(f.port, f.error) for f in result.failures] == [(0x512, "ZeroDivisionError")]
    assert result.differences[0].fields == ("status", "rax")
    assert result.differences[0].error == "ZeroDivisionError: the planted bug"


def test_an_intercept_without_completion_is_not_compared() -> None:
    events = record(sequenced(), [port_frame(0x513), port_frame(0x513)])
    result = replay(events[:-1], sequenced())
    assert result.replayed == 2 and result.not_compared == 1 and result.ok


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda ev: [ev[1], ev[0]], "event 0: a completion for partition 0, VP 0x0 with no intercept before it"),
        (lambda ev: [ev[0]._replace(virtual_ns=5000), ev[1], ev[2]._replace(virtual_ns=10)], "event 2: virtual time"),
        (lambda ev: [ev[0], ev[1], "junk"], "event 2: 'junk' is not a trace event"),
        (lambda ev: [MemoryRead(0, 0, 0x1000, b"x"), *ev], "event 0: guest memory accessed outside any intercept"),
    ],
)
def test_unreplayable_traces_raise(mangle: Callable[[list[TraceEvent]], list[TraceEvent]], message: str) -> None:
    events = record(sequenced(), [port_frame(0x513), port_frame(0x513)])
    with pytest.raises(ReplayError, match=message.replace("(", r"\(").replace(")", r"\)")):
        replay(mangle(events), sequenced(), clock=VirtualClock())


class Fifo:
    """0x600: OUTS bytes go in, INS bytes come out (one byte added, to tell the versions apart)."""

    io_base = 0x600

    def __init__(self, add: int = 0) -> None:
        self.data = bytearray()
        self.add = add

    @on_port(0, max_size=1)
    def io(self, access: PortAccess) -> int | None:
        if access.is_write:
            self.data.append(access.value)
            return None
        return (self.data.pop(0) + self.add) & 0xFF if self.data else 0


def fifo(add: int = 0) -> Router:
    router = Router()
    router.include(Fifo(add))
    return router


def test_string_io_memory_is_served_and_compared() -> None:
    memory = BufferMemory([(0, bytearray(0x10000))])
    memory.write(0x2000, b"hello")
    steps = [
        string_frame(0x600, outs=True, count=5, address=0x2000),
        string_frame(0x600, outs=False, count=5, address=0x3000),
    ]
    events = record(fifo(), steps, memory=memory)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Intercept", "MemoryRead", "Completion", "Intercept", "MemoryWrite", "Completion"]
    assert replay(events, fifo()).ok
    result = replay(events, fifo(add=1))
    assert [(d.kind, d.fields) for d in result.differences] == [("memory-write", ("data",))]
    assert "5 bytes at 0x3000: 68 65 6c 6c 6f" in result.differences[0].expected


def test_interrupt_edges_and_acknowledges_are_compared() -> None:
    def steps() -> list[bytes | Advance | Ack]:
        return [port_frame(0x43, write=True, value=0x34), port_frame(0x40, write=True, value=0x00),
                port_frame(0x40, write=True, value=0x01), port_frame(0x21, write=True, value=0xFE),
                Advance(1_000_000), Ack(), Advance(2_000_000), Ack()]  # fmt: skip

    clock = VirtualClock()
    pc = build_pc(clock=clock, start_time=START)
    events = record(pc, steps(), clock=clock, taps=[pc.pit.irq])
    assert any(type(e) is IrqEdge for e in events)
    clock = VirtualClock()
    result = replay(events, build_pc(clock=clock, start_time=START), clock=clock)
    assert result.ok and result.irqs_compared
    assert [e.vector for e in events if type(e) is Acknowledge] == [0x00, None]


class Doorbell:
    """0x700: writing 1 raises its line, 0 lowers it (``inverted`` does the opposite)."""

    io_base = 0x700

    def __init__(self, irq: IrqLine, inverted: bool = False) -> None:
        self.irq = irq
        self.inverted = inverted

    @on_port(0)
    def io(self, access: PortAccess) -> int | None:
        if access.is_write:
            self.irq.set(bool(access.value) != self.inverted)
        return None if access.is_write else int(self.irq.level)


def doorbell(inverted: bool = False) -> tuple[Router, IrqLine]:
    router, line = Router(), IrqLine(IrqRecorder(), 9)
    router.include(Doorbell(line, inverted))
    return router, line


def test_an_edge_out_of_step_is_one_difference() -> None:
    router, line = doorbell()
    events = record(router, [port_frame(0x700, write=True, value=v) for v in (1, 0, 1, 0)], taps=[line])
    assert [e.level for e in events if type(e) is IrqEdge] == [True, False, True, False]
    result = replay(events, doorbell()[0])
    assert result.ok and result.irqs_compared
    result = replay(events, doorbell(inverted=True)[0])
    assert [(d.kind, d.expected, d.got) for d in result.differences] == [("irq", "IRQ9 raised", "no edge")]
    assert not replay(events, doorbell(inverted=True)[0], compare_irqs=False).differences


class Board:
    """A doorbell and an interrupt controller of one vector (0x30), for acknowledge cycles."""

    def __init__(self, vector: int = 0x30) -> None:
        self.router, self.line = doorbell()
        self.vector = vector

    def acknowledge(self) -> int | None:
        return self.vector if self.line.level else None


def test_acknowledges_are_compared() -> None:
    board = Board()
    events = record(board.router, [port_frame(0x700, write=True, value=1)])
    events.append(Acknowledge(events[-1].virtual_ns, 0, 0x30))
    assert replay(events, Board()).ok
    result = replay(events, Board(vector=0x31))
    assert [(d.kind, d.expected, d.got) for d in result.differences] == [("acknowledge", "vector 0x30", "vector 0x31")]
    with pytest.raises(ReplayError, match="the machine has no acknowledge"):
        replay(events, doorbell()[0])
