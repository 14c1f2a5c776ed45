"""Replay throughput: intercepts replayed per second against the example PC, beside the in-memory dispatch rate.

The trace is 20,000 accesses of the kind SeaBIOS makes while it boots (PIT
counter reads, CMOS index and data, COM1's line status, PCI configuration
through 0xCF8/0xCFC, port 0x61 and POST codes), one every microsecond of
virtual time, a timer poll every 40 accesses, recorded from a PC on a
virtual clock. ``replay_per_s`` replays it against a fresh PC (clock moved
per event, every completion compared). The baseline is the in-memory
dispatcher on the same frames: a ``Dispatcher`` serving a fresh PC over the
in-memory transport, one intercept in flight at a time as a VP makes them
(what a test with the fake VP pays); ``replay_ratio`` is replay over it.
Beside them, the bare engine (``Engine.receive``, one frame per call,
nothing compared) bounds what any replay could reach:
``replay_engine_ratio``.
"""

from __future__ import annotations

import random
import statistics
import time
from datetime import UTC, datetime

import anyio

from dispatcher import Dispatcher, Engine
from dispatcher.clock import VirtualClock
from dispatcher.replay import replay
from dispatcher.trace_records import ClockAdvance, Completion, Intercept, TraceEvent
from examples.pc_devices import PC, build_pc
from transports.service.client import io_intercept

# The RTC starts here on every PC built, so its clock reads the same in the recording and the replays.
START = datetime(2024, 1, 1, tzinfo=UTC)


def _pc(clock: VirtualClock) -> PC:
    return build_pc(clock=clock, start_time=START)


def _frame(port: int, size: int, write: bool, value: int = 0) -> bytes:
    return io_intercept(port, size, write=write, value=value)


def bios_frames(count: int, seed: int = 1) -> list[bytes]:
    """``count`` accesses a BIOS makes, in a reproducible random order."""
    rng = random.Random(seed)
    frames = [_frame(0x43, 1, True, 0x34), _frame(0x40, 1, True, 0), _frame(0x40, 1, True, 0)]
    while len(frames) < count:
        pick = rng.randrange(8)
        if pick == 0:
            frames += [_frame(0x70, 1, True, rng.randrange(0x40)), _frame(0x71, 1, False)]
        elif pick == 1:
            frames += [_frame(0x43, 1, True, 0x00), _frame(0x40, 1, False), _frame(0x40, 1, False)]
        elif pick == 2:
            frames.append(_frame(0x3FD, 1, False))
        elif pick == 3:
            frames += [_frame(0xCF8, 4, True, 0x8000_0000 | rng.randrange(0, 0x800, 4)), _frame(0xCFC, 4, False)]
        elif pick == 4:
            frames.append(_frame(0x61, 1, False))
        else:
            frames.append(_frame(0x80, 1, True, rng.randrange(256)))
    return frames[:count]


def recorded(frames: list[bytes]) -> list[TraceEvent]:
    """The trace of ``frames`` on a PC with a virtual clock: intercepts 1 us apart, a poll every 40."""
    clock = VirtualClock()
    pc = _pc(clock)
    engine = Engine(pc.router, deadline=None)
    events: list[TraceEvent] = []
    for i, frame in enumerate(frames, 1):
        now = i * 1000
        clock.advance_to(now)
        events.append(Intercept(now, now, frame))
        events += [Completion(now, now, completion) for completion in engine.receive((frame,))[0]]
        if i % 40 == 0:
            events.append(ClockAdvance(now, now))
            pc.poll()
    return events


def _replay_rate(events: list[TraceEvent], intercepts: int) -> float:
    clock = VirtualClock()
    pc = _pc(clock)
    started = time.perf_counter()
    result = replay(events, pc, clock=clock)
    elapsed = time.perf_counter() - started
    assert result.ok and result.replayed == intercepts, result.summary
    return intercepts / elapsed


def _memory_rate(frames: list[bytes]) -> float:
    pc = _pc(VirtualClock())
    receive = Engine(pc.router, deadline=None).receive
    started = time.perf_counter()
    for frame in frames:
        receive((frame,))
    return len(frames) / (time.perf_counter() - started)


def _dispatcher_rate(frames: list[bytes]) -> float:
    from transports.memory import memory_transport_pair

    pc = _pc(VirtualClock())
    dispatcher = Dispatcher(pc.router, deadline=None)

    async def main() -> float:
        vmm, service = memory_transport_pair()
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.serve, service)
            started = time.perf_counter()
            for frame in frames:
                await vmm.send_batch([frame])
                await vmm.receive_batch()
            elapsed = time.perf_counter() - started
            dispatcher.stop()
            await vmm.aclose()
        return len(frames) / elapsed

    return anyio.run(main)


def run(quick: bool) -> dict[str, float]:
    count = 5_000 if quick else 20_000
    rounds = 3 if quick else 7
    frames = bios_frames(count)
    events = recorded(frames)
    # Alternated, so that a stall of the machine falls on all three alike.
    replays, dispatchers, engines = [], [], []
    for _ in range(rounds):
        replays.append(_replay_rate(events, count))
        dispatchers.append(_dispatcher_rate(frames))
        engines.append(_memory_rate(frames))
    replayed, dispatched, engine = (statistics.median(rates) for rates in (replays, dispatchers, engines))
    print(f"replay against a fresh PC            {replayed:>10,.0f} intercepts/s")
    print(f"in-memory dispatcher, same accesses  {dispatched:>10,.0f} intercepts/s   replay_ratio", end=" ")
    print(f"{replayed / dispatched:.2f}")
    print(f"bare engine, same accesses           {engine:>10,.0f} intercepts/s   replay_engine_ratio", end=" ")
    print(f"{replayed / engine:.2f}")
    return {
        "replay_per_s": replayed,
        "replay_dispatcher_per_s": dispatched,
        "replay_ratio": replayed / dispatched,
        "replay_engine_per_s": engine,
        "replay_engine_ratio": replayed / engine,
    }
