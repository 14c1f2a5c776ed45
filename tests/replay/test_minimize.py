"""Minimizing: ddmin itself, the units it removes, and whole traces that raise or hang."""

from __future__ import annotations

import random
from pathlib import Path

from buggy_devices import looping, sequenced
from recording import Advance, port_frame, record

from dispatcher.clock import VirtualClock
from dispatcher.minimize import ddmin, trace_units
from dispatcher.trace import TraceWriter, new_metadata, read_trace
from dispatcher.trace_records import Intercept
from transports.testbench.minimize_command import Machine, minimize_trace

HERE = Path(__file__).parent


def test_ddmin_finds_a_one_minimal_subset() -> None:
    calls = []

    def fails(items: list[int]) -> bool:
        calls.append(len(items))
        return {3, 17, 42} <= set(items)

    assert ddmin(list(range(100)), fails) == [3, 17, 42]
    assert ddmin([1, 2, 3], lambda items: True) == []
    assert ddmin([5], lambda items: bool(items)) == [5]
    assert len(calls) < 200


def test_units_keep_an_intercept_with_what_belongs_to_it() -> None:
    clock = VirtualClock()
    events = record(looping(fixed=True), [Advance(10), port_frame(0x520), port_frame(0x521, write=True, value=1)],
                    clock=clock)  # fmt: skip
    units = trace_units(events)
    assert [[type(e).__name__ for e in unit] for unit in units] == [
        ["ClockAdvance", "Intercept", "Completion"],
        ["Intercept", "Completion"],
    ]


def buried(steps: list[bytes], count: int, ports: range, seed: int = 7) -> list[bytes]:
    """``steps``, in order, among ``count`` harmless random accesses to ``ports``."""
    rng = random.Random(seed)
    noise = []
    for _ in range(count):
        write = rng.random() < 0.5
        noise.append(port_frame(rng.choice(ports), write=write, value=rng.randrange(0x50) if write else 0))
    places = sorted(rng.sample(range(count), len(steps)))
    for offset, (place, step) in enumerate(zip(places, steps, strict=True)):
        noise.insert(place + offset, step)
    return noise


def test_a_raise_minimizes_to_the_accesses_it_needs() -> None:
    needed = [port_frame(0x510, write=True, value=0x5A), port_frame(0x511, write=True, value=0xA5), port_frame(0x512)]
    events = record(sequenced(fixed=True), buried(needed, 500, range(0x510, 0x514)))
    minimized = minimize_trace(events, Machine("buggy_devices:sequenced", {}), timeout=30)
    assert minimized.failure == ("raise", 0x512, "ZeroDivisionError")
    kept = [e.frame for e in minimized.events if type(e) is Intercept]
    assert kept == needed


def test_a_hang_minimizes_to_the_accesses_it_needs(tmp_path: Path) -> None:
    needed = [port_frame(0x521, write=True, value=0x77), port_frame(0x520)]
    rng = random.Random(3)
    noise = [port_frame(0x521, write=True, value=rng.randrange(0x70)) for _ in range(30)]
    events = record(looping(fixed=True), noise[:12] + needed[:1] + noise[12:] + needed[1:])
    # A candidate runs in a child stopped after the timeout: only the hanging ones take that long.
    minimized = minimize_trace(events, Machine("buggy_devices:looping", {}), timeout=0.5)
    assert minimized.failure == ("hang", 0x520, "timeout")
    assert [e.frame for e in minimized.events if type(e) is Intercept] == needed
    path = tmp_path / "small.trace"
    with TraceWriter(path, new_metadata("test", machine="buggy_devices:looping")) as writer:
        writer.write_all(minimized.events)
    assert read_trace(path).intercepts == 2
