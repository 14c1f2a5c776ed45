"""Virtual time: a clock that moves only when a test (or a replay) moves it.

A :class:`VirtualClock` is a drop-in ``clock=`` for the example devices:
calling it gives the time in seconds, as :func:`time.monotonic` would, but
the time stands still until :meth:`~VirtualClock.advance` moves it. Moving it
runs, in time order, every timer that falls due on the way and polls every
watched device at the moment it said it had something to do::

    clock = VirtualClock()
    pit = Pit8254(irq=irqs.line(0), clock=clock)
    clock.watch(pit)  # polled exactly at each next_due()
    clock.advance(10_000_000)  # 10 ms of guest time, instantly

Time is kept in whole nanoseconds. While a timer or a poll runs, the clock
reads exactly its deadline, so a device sees its deadline reached and not a
nanosecond more. Two things due at the same nanosecond run in the order
they were registered: the same calls give the same run, every time.

A device's deadline in seconds (a float) becomes the first nanosecond at
which the clock reads at least that many seconds, so that a device polled
there never finds itself a rounding error early.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol, runtime_checkable

from .errors import DispatchError

__all__ = [
    "MAX_FIRINGS_PER_INSTANT",
    "NS_PER_SECOND",
    "ClockError",
    "SteppedClock",
    "Timed",
    "Timer",
    "VirtualClock",
    "Watch",
    "ns_from_seconds",
]

NS_PER_SECOND = 1_000_000_000

MAX_FIRINGS_PER_INSTANT = 10_000
"""How many timers and polls may run at one nanosecond before the clock calls it a loop."""


class ClockError(DispatchError):
    """The virtual clock cannot go on: it was advanced from inside its own callback, or time stopped moving."""


@runtime_checkable
class SteppedClock(Protocol):
    """A clock read in nanoseconds and moved forward by its owner: a :class:`VirtualClock`, as recording and
    replay see it."""

    @property
    def now_ns(self) -> int: ...

    def advance_to(self, when_ns: int) -> object: ...


class Timed(Protocol):
    """A pull-driven device (or a whole machine): it says when it next has something to do, and does it."""

    def next_due(self) -> float | None: ...

    def poll(self) -> object: ...


def ns_from_seconds(seconds: float) -> int:
    """The first whole nanosecond at which a :class:`VirtualClock` reads at least ``seconds``."""
    if not math.isfinite(seconds):
        raise ValueError(f"deadline {seconds} s is not a finite time")
    ns = math.ceil(seconds * NS_PER_SECOND)
    # The product rounds: step to the exact first nanosecond whose reading reaches the deadline.
    while ns / NS_PER_SECOND < seconds:
        ns += 1
    while (ns - 1) / NS_PER_SECOND >= seconds:
        ns -= 1
    return ns


class Timer:
    """A callback due at ``when_ns``; :meth:`cancel` stops it if it has not run yet."""

    __slots__ = ("callback", "cancelled", "order", "when_ns")

    def __init__(self, when_ns: int, order: int, callback: Callable[[], object]) -> None:
        self.when_ns = when_ns
        self.order = order
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __repr__(self) -> str:
        state = " cancelled" if self.cancelled else ""
        return f"<Timer at {self.when_ns} ns{state}: {self.callback!r}>"


class Watch:
    """A watched :class:`Timed` object; :meth:`cancel` stops polling it."""

    __slots__ = ("_settled", "cancelled", "order", "timed")

    def __init__(self, timed: Timed, order: int) -> None:
        self.timed = timed
        self.order = order
        self.cancelled = False
        # A deadline the object still reported right after being polled at or past it: it has
        # nothing new to do there (a line held high until the guest reads a register, say), so it
        # is ignored until next_due() says something else.
        self._settled: int | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def _deadline(self, now_ns: int) -> int | None:
        """When this object must next be polled (never before ``now_ns``), or None."""
        due = self.timed.next_due()
        if due is None:
            self._settled = None
            return None
        due_ns = ns_from_seconds(due)
        if due_ns == self._settled:
            return None
        self._settled = None
        return max(due_ns, now_ns)

    def _poll(self, now_ns: int) -> None:
        self.timed.poll()
        due = self.timed.next_due()
        if due is not None and (due_ns := ns_from_seconds(due)) <= now_ns:
            self._settled = due_ns

    def __repr__(self) -> str:
        state = " cancelled" if self.cancelled else ""
        return f"<Watch{state}: {self.timed!r}>"


class VirtualClock:
    """Devices' time, in nanoseconds, moved only by :meth:`advance` and friends.

    ``start_ns`` is the first reading. ``lock`` (a context manager, such as a
    dispatcher's device lock) is held while the clock runs timers and polls,
    and while it asks watched objects for their deadlines; it may be set
    later, before the clock first moves.
    """

    def __init__(self, start_ns: int = 0, *, lock: AbstractContextManager[object] | None = None) -> None:
        if start_ns < 0:
            raise ValueError(f"start_ns {start_ns} is negative")
        self._now_ns = start_ns
        self.lock = lock
        self._timers: list[tuple[int, int, Timer]] = []
        self._watches: list[Watch] = []
        self._order = itertools.count()
        self._running = False

    def __call__(self) -> float:
        """The time in seconds: a ``clock=`` for devices."""
        return self._now_ns / NS_PER_SECOND

    @property
    def now_ns(self) -> int:
        """The time in nanoseconds (a running timer's or poll's deadline while it runs)."""
        return self._now_ns

    def __repr__(self) -> str:
        return f"<VirtualClock at {self._now_ns} ns, {len(self._timers)} timers, {len(self._watches)} watched>"

    def _locked(self) -> AbstractContextManager[object]:
        return self.lock if self.lock is not None else nullcontext()

    # -- scheduling -------------------------------------------------------------------------------

    def call_at(self, when_ns: int, callback: Callable[[], object]) -> Timer:
        """Run ``callback()`` when the clock reaches ``when_ns`` (now or later)."""
        if when_ns < self._now_ns:
            raise ValueError(f"call_at({when_ns}) is before the clock's time, {self._now_ns} ns")
        timer = Timer(when_ns, next(self._order), callback)
        heapq.heappush(self._timers, (when_ns, timer.order, timer))
        return timer

    def call_later(self, delay_ns: int, callback: Callable[[], object]) -> Timer:
        """Run ``callback()`` ``delay_ns`` nanoseconds from now (0: within the current or next advance)."""
        if delay_ns < 0:
            raise ValueError(f"call_later delay {delay_ns} ns is negative")
        return self.call_at(self._now_ns + delay_ns, callback)

    def watch(self, timed: Timed) -> Watch:
        """Poll ``timed`` whenever the clock passes its ``next_due()`` (read again after every poll)."""
        watch = Watch(timed, next(self._order))
        self._watches.append(watch)
        return watch

    # -- moving -----------------------------------------------------------------------------------

    def next_deadline(self) -> int | None:
        """The earliest time, in ns, at which a timer or a watched poll is due, or None."""
        with self._locked():
            found = self._next()
            return None if found is None else found[0]

    def _next(self) -> tuple[int, Timer | Watch] | None:
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        best: tuple[int, int, Timer | Watch] | None = timers[0] if timers else None
        if any(watch.cancelled for watch in self._watches):
            self._watches = [watch for watch in self._watches if not watch.cancelled]
        for watch in self._watches:
            when = watch._deadline(self._now_ns)
            if when is not None and (best is None or (when, watch.order) < best[:2]):
                best = (when, watch.order, watch)
        return None if best is None else (best[0], best[2])

    def advance(self, ns: int) -> None:
        """Move the clock ``ns`` nanoseconds forward, running whatever falls due on the way."""
        if ns < 0:
            raise ValueError(f"advance({ns}): virtual time never goes backwards")
        self.advance_to(self._now_ns + ns)

    def advance_to(self, when_ns: int) -> None:
        """Move the clock to ``when_ns``, running every timer and poll due by then in time order.

        If a callback raises, the clock stays at that callback's deadline and
        the error propagates.

        :raises ValueError: ``when_ns`` is before the clock's time.
        :raises ClockError: called from one of this clock's callbacks, or
            more than ``MAX_FIRINGS_PER_INSTANT`` (10,000) callbacks ran at one
            nanosecond (something keeps rescheduling itself at the same time).
        """
        if not self._timers and not self._watches and not self._running and when_ns >= self._now_ns:
            self._now_ns = when_ns  # nothing can fall due (a replay's clock, say): no lock, no search
            return
        with self._locked():
            if self._running:
                raise ClockError(
                    f"advance_to({when_ns}) called from a timer or poll of the same clock: schedule a timer instead"
                )
            if when_ns < self._now_ns:
                raise ValueError(f"advance_to({when_ns}) is before the clock's time, {self._now_ns} ns")
            self._running = True
            try:
                instant, firings = self._now_ns, 0
                while (found := self._next()) is not None and found[0] <= when_ns:
                    deadline, item = found
                    if deadline != instant:
                        instant, firings = deadline, 0
                    firings += 1
                    if firings > MAX_FIRINGS_PER_INSTANT:
                        raise ClockError(
                            f"more than {MAX_FIRINGS_PER_INSTANT} timers and polls ran at {deadline} ns: "
                            f"{item!r} keeps falling due at the same time"
                        )
                    self._now_ns = deadline
                    if isinstance(item, Timer):
                        heapq.heappop(self._timers)
                        item.callback()
                    else:
                        item._poll(deadline)
                self._now_ns = when_ns
            finally:
                self._running = False

    def advance_to_next_deadline(self) -> int | None:
        """Move the clock to its next deadline and run what is due there; return that time, or None (nothing due)."""
        with self._locked():
            when = self.next_deadline()
            if when is not None:
                self.advance_to(when)
            return when
