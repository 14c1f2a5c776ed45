"""The virtual clock: time moves only when told, and everything due on the way runs at its deadline, in order."""

from __future__ import annotations

import functools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher import IrqRecorder, PortAccess
from dispatcher.clock import MAX_FIRINGS_PER_INSTANT, NS_PER_SECOND, ClockError, VirtualClock, ns_from_seconds
from examples.pit import PIT_HZ, Pit8254


def test_reads_seconds_and_nanoseconds() -> None:
    clock = VirtualClock(start_ns=1_500_000_000)
    assert clock.now_ns == 1_500_000_000
    assert clock() == 1.5
    clock.advance(250_000_000)
    assert clock.now_ns == 1_750_000_000 and clock() == 1.75
    clock.advance_to(2 * NS_PER_SECOND)
    assert clock() == 2.0
    assert clock.next_deadline() is None
    assert clock.advance_to_next_deadline() is None
    assert clock.now_ns == 2 * NS_PER_SECOND


def test_timers_run_in_time_order_reading_their_deadline() -> None:
    clock = VirtualClock()
    ran: list[tuple[str, int, float]] = []

    def note(name: str) -> None:
        ran.append((name, clock.now_ns, clock()))

    clock.call_at(300, lambda: note("c"))
    clock.call_at(100, lambda: note("a"))
    clock.call_later(200, lambda: note("b"))
    clock.call_at(1000, lambda: note("late"))
    assert clock.next_deadline() == 100
    clock.advance(500)
    assert ran == [("a", 100, 100e-9), ("b", 200, 200e-9), ("c", 300, 300e-9)]
    assert clock.now_ns == 500
    assert clock.advance_to_next_deadline() == 1000
    assert ran[-1] == ("late", 1000, 1000e-9)


def test_ties_run_in_registration_order() -> None:
    clock = VirtualClock()
    order: list[int] = []
    for index in (0, 1, 2, 3):
        clock.call_at(50, functools.partial(order.append, index))
    clock.call_at(40, lambda: order.append(-1))
    clock.advance(50)
    assert order == [-1, 0, 1, 2, 3]


def test_cancelled_timers_do_not_run() -> None:
    clock = VirtualClock()
    ran: list[str] = []
    first = clock.call_at(10, lambda: ran.append("first"))
    clock.call_at(20, lambda: ran.append("second"))
    first.cancel()
    assert clock.next_deadline() == 20
    clock.advance(100)
    assert ran == ["second"]


def test_callbacks_schedule_more_within_the_same_advance() -> None:
    """A callback may schedule at its own instant (runs next, still at that time) or later (runs if in range)."""
    clock = VirtualClock()
    ran: list[tuple[str, int]] = []

    def first() -> None:
        ran.append(("first", clock.now_ns))
        clock.call_later(0, lambda: ran.append(("same instant", clock.now_ns)))
        clock.call_later(30, lambda: ran.append(("later", clock.now_ns)))
        clock.call_later(1000, lambda: ran.append(("beyond", clock.now_ns)))

    clock.call_at(10, first)
    clock.call_at(10, lambda: ran.append(("tie", clock.now_ns)))
    clock.advance_to(100)
    assert ran == [("first", 10), ("tie", 10), ("same instant", 10), ("later", 40)]
    assert clock.next_deadline() == 1010


def test_a_periodic_timer_rescheduling_itself() -> None:
    clock = VirtualClock()
    ticks: list[int] = []

    def tick() -> None:
        ticks.append(clock.now_ns)
        clock.call_later(250, tick)

    clock.call_later(250, tick)
    clock.advance(1000)
    assert ticks == [250, 500, 750, 1000]


def test_advancing_from_a_callback_is_refused() -> None:
    clock = VirtualClock()
    clock.call_at(5, lambda: clock.advance(1))
    with pytest.raises(ClockError, match=r"called from a timer or poll of the same clock"):
        clock.advance(10)
    assert clock.now_ns == 5  # stopped where the failing callback ran
    clock.advance(10)  # and usable again
    assert clock.now_ns == 15


def test_a_callback_rescheduling_at_the_same_instant_forever_is_an_error() -> None:
    clock = VirtualClock()

    def again() -> None:
        clock.call_later(0, again)

    clock.call_at(7, again)
    with pytest.raises(ClockError, match=rf"more than {MAX_FIRINGS_PER_INSTANT} timers and polls ran at 7 ns"):
        clock.advance(10)


def test_a_callbacks_error_propagates_and_leaves_the_clock_at_its_deadline() -> None:
    clock = VirtualClock()
    ran: list[int] = []

    def fail() -> None:
        raise RuntimeError("device fault")

    clock.call_at(10, fail)
    clock.call_at(20, lambda: ran.append(clock.now_ns))
    with pytest.raises(RuntimeError, match="device fault"):
        clock.advance(100)
    assert clock.now_ns == 10
    clock.advance_to(100)
    assert ran == [20]


def test_time_never_goes_backwards() -> None:
    clock = VirtualClock(start_ns=100)
    with pytest.raises(ValueError, match=r"advance_to\(99\) is before the clock's time, 100 ns"):
        clock.advance_to(99)
    with pytest.raises(ValueError, match=r"advance\(-1\): virtual time never goes backwards"):
        clock.advance(-1)
    with pytest.raises(ValueError, match=r"call_at\(50\) is before the clock's time, 100 ns"):
        clock.call_at(50, lambda: None)
    with pytest.raises(ValueError, match=r"delay -5 ns is negative"):
        clock.call_later(-5, lambda: None)
    with pytest.raises(ValueError, match=r"start_ns -1 is negative"):
        VirtualClock(start_ns=-1)
    assert clock.now_ns == 100


class CountingLock:
    """A context manager that counts how deep it is held."""

    def __init__(self) -> None:
        self.held = 0

    def __enter__(self) -> None:
        self.held += 1

    def __exit__(self, *exc: object) -> None:
        self.held -= 1


def test_the_lock_is_held_while_callbacks_and_polls_run() -> None:
    lock = CountingLock()
    clock = VirtualClock(lock=lock)
    seen: list[int] = []
    clock.call_at(1, lambda: seen.append(lock.held))
    device = Device(clock, [2e-9])
    device.poll = lambda: seen.append(lock.held)  # type: ignore[method-assign]
    clock.watch(device)
    clock.advance(2)
    assert seen == [1, 1] and lock.held == 0


@given(st.floats(min_value=0, max_value=1e7, allow_nan=False))
def test_float_deadlines_round_up_to_the_first_nanosecond_reaching_them(seconds: float) -> None:
    ns = ns_from_seconds(seconds)
    assert ns / NS_PER_SECOND >= seconds
    assert (ns - 1) / NS_PER_SECOND < seconds


def test_non_finite_deadlines_are_refused() -> None:
    with pytest.raises(ValueError, match="deadline inf s is not a finite time"):
        ns_from_seconds(math.inf)


class Device:
    """A pull-driven device: something to do at each time in ``due`` (seconds), one after another."""

    def __init__(self, clock: VirtualClock, due: list[float]) -> None:
        self.clock = clock
        self.due = due
        self.polls: list[tuple[int, float]] = []

    def next_due(self) -> float | None:
        return self.due[0] if self.due else None

    def poll(self) -> None:
        self.polls.append((self.clock.now_ns, self.clock()))
        while self.due and self.due[0] <= self.clock():
            self.due.pop(0)


def test_watched_devices_are_polled_exactly_at_their_float_deadlines() -> None:
    clock = VirtualClock()
    device = Device(clock, [1 / 3, 2 / 3, 1.0])
    clock.watch(device)
    clock.advance(NS_PER_SECOND)
    assert [ns for ns, _ in device.polls] == [333_333_334, 666_666_667, 1_000_000_000]
    assert all(seconds >= due for (_, seconds), due in zip(device.polls, [1 / 3, 2 / 3, 1.0], strict=True))
    assert device.due == []


def test_watches_and_timers_share_the_order_of_ties() -> None:
    clock = VirtualClock()
    ran: list[str] = []
    clock.call_at(1000, lambda: ran.append("timer before"))
    device = Device(clock, [1e-6])
    clock.watch(device)
    clock.call_at(1000, lambda: ran.append(f"timer after, {len(device.polls)} poll"))
    clock.advance(1000)
    assert ran == ["timer before", "timer after, 1 poll"]


def test_an_overdue_device_is_polled_now_and_a_settled_one_is_left_alone() -> None:
    """A device that says it is due in the past is polled at once; one still due right after its poll (an
    interrupt held until the guest acts) is not polled again until its next_due() changes."""
    clock = VirtualClock(start_ns=5000)
    device = Device(clock, [1e-6])  # due at 1000 ns, before the clock's time
    stuck = Device(clock, [2e-6])
    stuck.poll = lambda: stuck.polls.append((clock.now_ns, clock()))  # type: ignore[method-assign]
    clock.watch(device)
    clock.watch(stuck)
    assert clock.next_deadline() == 5000
    clock.advance(10_000)
    assert [ns for ns, _ in device.polls] == [5000]
    assert [ns for ns, _ in stuck.polls] == [5000]  # once, though it still says 2000 ns
    assert clock.next_deadline() is None
    stuck.due = [20e-6]  # the guest acted: something new to do
    clock.advance(10_000)
    assert [ns for ns, _ in stuck.polls] == [5000, 20_000]


def test_a_cancelled_watch_is_not_polled() -> None:
    clock = VirtualClock()
    device = Device(clock, [1e-6, 2e-6])
    watch = clock.watch(device)
    clock.advance(1000)
    watch.cancel()
    clock.advance(10_000)
    assert [ns for ns, _ in device.polls] == [1000]


def test_a_watched_pit_gives_irq0_edges_at_exact_input_clock_periods() -> None:
    """Pit8254 in mode 2 with a count of N: IRQ 0 rises every N periods of the 1.193182 MHz input, each at
    the first nanosecond the clock reaches that tick, with no drift over thousands of periods."""
    clock = VirtualClock(start_ns=1000 * NS_PER_SECOND)
    irqs = IrqRecorder(clock)
    pit = Pit8254(irq=irqs.line(0), clock=clock)
    clock.watch(pit)
    count = 3
    start_tick = pit.tick()
    pit.control_word(PortAccess(0x43, 1, True, 0x34, 3, 0, 0))  # channel 0, LSB then MSB, mode 2
    pit.counters(PortAccess(0x40, 1, True, count, 0, 0, 0))
    pit.counters(PortAccess(0x40, 1, True, 0, 0, 0, 0))
    irqs.clear()
    clock.advance(10_000_000)
    edges = irqs.edges(0)
    # The count loads on the next CLK, then OUT rises every N CLKs: tick start + 1 + N * k, at ceil(tick / f) s.
    expected = [-(-(start_tick + 1 + count * k) * NS_PER_SECOND // PIT_HZ) for k in range(1, len(edges) + 1)]
    assert edges == expected
    assert len(edges) == (pit.tick() - start_tick - 1) // count > 3900  # every period in 10 ms
