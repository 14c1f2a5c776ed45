"""Interrupt lines from device models to whatever receives them.

A device holds an :class:`IrqLine` and drives its level. The line forwards
every change of level, and only changes, to an :class:`IrqReceiver`: the
PIC model, a KVM injector, or an :class:`IrqRecorder` in tests.

Semantics: a line is a wire with a level. A level-triggered receiver sees
the interrupt for as long as the level is high; an edge-triggered receiver
latches a request on each low-to-high transition, so a device that wants a
second edge must lower the line first (:meth:`IrqLine.pulse` does both).

Tests intercept interrupts with an :class:`IrqRecorder`, as qtest's
``irq_intercept_in`` does: wire a device's line to it (:meth:`IrqRecorder.line`)
or tap a line that is already wired (:meth:`IrqRecorder.tap`), and it keeps
every change with the virtual time it happened at. With a
:class:`~dispatcher.clock.VirtualClock` a test can wait for an edge::

    clock = VirtualClock()
    irqs = IrqRecorder(clock)
    pit = Pit8254(irq=irqs.line(0), clock=clock)
    clock.watch(pit)
    first = irqs.wait_for_edge(0, limit_ns=100_000_000)  # advances the clock to IRQ 0's next rise
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

from .clock import NS_PER_SECOND, VirtualClock
from .errors import DispatchError

if TYPE_CHECKING:
    from .router import Router

__all__ = [
    "NO_RECEIVER",
    "InterruptController",
    "IrqEvent",
    "IrqLine",
    "IrqReceiver",
    "IrqRecorder",
    "IrqWaitTimeout",
    "device_lines",
    "tap_line",
    "untap_line",
]


class IrqReceiver(Protocol):
    """Anything that takes line levels: ``set_irq(line, level)`` on every change."""

    def set_irq(self, line: int, level: bool) -> None: ...


@runtime_checkable
class InterruptController(Protocol):
    """The CPU's side of an interrupt controller (an i8259A pair answers this): ``pending_vector()``, and
    ``acknowledge()``, the acknowledge cycle, which gives the vector."""

    def pending_vector(self) -> int | None: ...

    def acknowledge(self) -> int: ...


class _NoReceiver:
    def set_irq(self, line: int, level: bool) -> None:
        pass


NO_RECEIVER: IrqReceiver = _NoReceiver()
"""A receiver that drops every change: for devices whose interrupts nobody wires."""


class IrqLine:
    """One interrupt line, numbered for its receiver and named for people."""

    __slots__ = ("_level", "line", "name", "receiver")

    def __init__(self, receiver: IrqReceiver = NO_RECEIVER, line: int = 0, name: str = "") -> None:
        self.receiver = receiver
        self.line = line
        self.name = name or f"IRQ{line}"
        self._level = False

    @property
    def level(self) -> bool:
        return self._level

    def set(self, level: bool) -> None:
        """Drive the line to ``level``; the receiver hears only a change."""
        level = bool(level)
        if level != self._level:
            self._level = level
            self.receiver.set_irq(self.line, level)

    def raise_(self) -> None:
        """Drive the line high (``raise`` is a Python keyword)."""
        self.set(True)

    def lower(self) -> None:
        self.set(False)

    def pulse(self) -> None:
        """A rising then a falling edge: one request to an edge-triggered receiver."""
        self.set(True)
        self.set(False)

    def __repr__(self) -> str:
        return f"IrqLine({self.name}, line={self.line}, level={int(self._level)})"


class IrqEvent(NamedTuple):
    """``line`` went to ``level`` at ``time_ns`` by the recorder's clock (0 for a recorder without one)."""

    line: int
    level: bool
    time_ns: int = 0


class IrqWaitTimeout(DispatchError, AssertionError):
    """:meth:`IrqRecorder.wait_for_edge` advanced the clock to its limit and the edge did not come."""


class _Tap:
    """A line's receiver while it is tapped: tells the listener, then the receiver the line had before."""

    __slots__ = ("forward", "listener")

    def __init__(self, listener: IrqReceiver, forward: IrqReceiver) -> None:
        self.listener = listener
        self.forward = forward

    def set_irq(self, line: int, level: bool) -> None:
        self.listener.set_irq(line, level)
        self.forward.set_irq(line, level)


def tap_line(line: IrqLine, listener: IrqReceiver) -> IrqLine:
    """Have ``listener`` hear every change of ``line`` too, before the receiver it had; returns ``line``."""
    line.receiver = _Tap(listener, line.receiver)
    return line


def untap_line(line: IrqLine, listener: IrqReceiver) -> None:
    """Undo :func:`tap_line`: give ``line`` back its receiver from before."""
    receiver = line.receiver
    if not isinstance(receiver, _Tap) or receiver.listener is not listener:
        raise ValueError(f"{line.name} is not tapped by this recorder (or was tapped again since)")
    line.receiver = receiver.forward


LineId = int | IrqLine
"""A line by its number, or the :class:`IrqLine` itself."""


def _number(line: LineId) -> int:
    return line.line if isinstance(line, IrqLine) else line


class IrqRecorder:
    """A receiver for tests: remembers every change of every line, when it happened, and each line's level.

    ``clock`` stamps each :class:`IrqEvent`: a
    :class:`~dispatcher.clock.VirtualClock` (its exact nanoseconds) or any
    callable giving seconds. Without one every event's time is 0. Lines
    are named by number or by the :class:`IrqLine` itself.
    """

    def __init__(self, clock: VirtualClock | Callable[[], float] | None = None) -> None:
        self.clock = clock
        self.events: list[IrqEvent] = []
        self.levels: dict[int, bool] = {}
        self._names: dict[int, str] = {}

    def now_ns(self) -> int:
        """The recorder's clock now, in nanoseconds (0 without a clock)."""
        clock = self.clock
        if clock is None:
            return 0
        if isinstance(clock, VirtualClock):
            return clock.now_ns
        return round(clock() * NS_PER_SECOND)

    def set_irq(self, line: int, level: bool) -> None:
        self.events.append(IrqEvent(line, level, self.now_ns()))
        self.levels[line] = level

    def level(self, line: LineId) -> bool:
        """The level this recorder last saw on ``line`` (low if it saw nothing)."""
        return self.levels.get(_number(line), False)

    def rising_edges(self, line: LineId) -> int:
        """How many times ``line`` went from low to high."""
        number = _number(line)
        return sum(1 for e in self.events if e.line == number and e.level)

    def edges(self, line: LineId, rising: bool = True) -> list[int]:
        """The times, in ns, at which ``line`` rose (or fell, with ``rising=False``), oldest first."""
        number = _number(line)
        return [e.time_ns for e in self.events if e.line == number and e.level == rising]

    def clear(self) -> None:
        """Forget the events so far; the lines' levels stay as they are."""
        self.events.clear()

    def line(self, line: int, name: str = "") -> IrqLine:
        """A new line wired to this recorder."""
        wire = IrqLine(self, line, name)
        self._names[line] = wire.name
        return wire

    def tap(self, line: IrqLine) -> IrqLine:
        """Record every change of ``line`` and still pass it on to the receiver it had; returns ``line``.

        Events are filed under ``line.line``, the number its receiver knows it by.
        """
        tap_line(line, self)
        self.levels[line.line] = line.level
        self._names[line.line] = line.name
        return line

    def untap(self, line: IrqLine) -> None:
        """Give ``line`` back its receiver from before :meth:`tap`."""
        untap_line(line, self)

    def _name(self, number: int) -> str:
        return self._names.get(number, f"IRQ{number}")

    def assert_edge(self, line: LineId, rising: bool = True, *, at_ns: int | None = None, within_ns: int = 0) -> int:
        """Check that ``line`` rose (or fell), at ``at_ns`` +/- ``within_ns`` if given; return that edge's time.

        :raises AssertionError: naming the line, the edge wanted and the edges there were.
        """
        number = _number(line)
        times = self.edges(number, rising)
        if at_ns is None:
            if times:
                return times[0]
            wanted = ""
        else:
            for time in times:
                if abs(time - at_ns) <= within_ns:
                    return time
            wanted = f" at {at_ns} ns" + (f" (+/- {within_ns} ns)" if within_ns else "")
        kind = "rising" if rising else "falling"
        shown = ", ".join(str(t) for t in times[:10]) + (", ..." if len(times) > 10 else "")
        raise AssertionError(
            f"{self._name(number)}: no {kind} edge{wanted}; {kind} edges at [{shown}] ns"
            if times
            else f"{self._name(number)}: no {kind} edge{wanted}; it had none"
        )

    def wait_for_edge(
        self, line: LineId, rising: bool = True, *, limit_ns: int, clock: VirtualClock | None = None
    ) -> int:
        """Advance the virtual clock, deadline by deadline, until ``line`` rises (or falls); return that time.

        Only an edge after the call counts. ``clock`` defaults to the
        recorder's, which must then be a :class:`~dispatcher.clock.VirtualClock`.
        The clock stops at the edge's deadline (with everything else due
        then run), or at most ``limit_ns`` nanoseconds on.

        :raises IrqWaitTimeout: no such edge within ``limit_ns``; the clock is then ``limit_ns`` on.
        """
        clock = clock if clock is not None else self.clock if isinstance(self.clock, VirtualClock) else None
        if clock is None:
            raise TypeError("wait_for_edge needs a VirtualClock: give the recorder one, or pass clock=")
        if limit_ns < 0:
            raise ValueError(f"limit_ns {limit_ns} is negative")
        number = _number(line)
        start, seen = clock.now_ns, len(self.events)
        limit = start + limit_ns
        while True:
            deadline = clock.next_deadline()
            clock.advance_to(limit if deadline is None or deadline > limit else deadline)
            for event in self.events[seen:]:
                if event.line == number and event.level == rising:
                    return event.time_ns
            seen = len(self.events)
            if clock.now_ns == limit:
                kind = "rising" if rising else "falling"
                due = clock.next_deadline()
                why = "nothing is due" if due is None else f"the clock's next deadline is {due} ns"
                raise IrqWaitTimeout(
                    f"{self._name(number)}: no {kind} edge from {start} to {limit} ns (limit_ns={limit_ns}); {why}"
                )


def device_lines(router: Router) -> list[IrqLine]:
    """The interrupt lines the devices behind ``router``'s claims hold and something receives, each once.

    What a recorder taps and a replay compares when a machine does not list
    its lines itself. A line wired to nothing (a PIC's output nobody takes)
    is no part of the machine's traffic.
    """
    found: dict[int, IrqLine] = {}
    for claim in router.claims:
        owner = getattr(claim.handler, "__self__", None)
        if owner is None:
            continue
        for value in _attributes(owner):
            if isinstance(value, IrqLine) and value.receiver is not NO_RECEIVER:
                found.setdefault(id(value), value)
    return list(found.values())


def _attributes(owner: object) -> list[object]:
    values = list(getattr(owner, "__dict__", {}).values())
    for cls in type(owner).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if isinstance(name, str) and hasattr(owner, name):
                values.append(getattr(owner, name))
    return values
