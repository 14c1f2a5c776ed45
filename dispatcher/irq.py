"""Interrupt lines from device models to whatever receives them.

A device holds an :class:`IrqLine` and drives its level. The line forwards
every change of level, and only changes, to an :class:`IrqReceiver`: the
PIC model, a KVM injector, or an :class:`IrqRecorder` in tests.

Semantics: a line is a wire with a level. A level-triggered receiver sees
the interrupt for as long as the level is high; an edge-triggered receiver
latches a request on each low-to-high transition, so a device that wants a
second edge must lower the line first (:meth:`IrqLine.pulse` does both).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

__all__ = ["NO_RECEIVER", "IrqEvent", "IrqLine", "IrqReceiver", "IrqRecorder"]


class IrqReceiver(Protocol):
    """Anything that takes line levels: ``set_irq(line, level)`` on every change."""

    def set_irq(self, line: int, level: bool) -> None: ...


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
    line: int
    level: bool


class IrqRecorder:
    """A receiver for tests: remembers every change and each line's level."""

    def __init__(self) -> None:
        self.events: list[IrqEvent] = []
        self.levels: dict[int, bool] = {}

    def set_irq(self, line: int, level: bool) -> None:
        self.events.append(IrqEvent(line, level))
        self.levels[line] = level

    def level(self, line: int) -> bool:
        return self.levels.get(line, False)

    def rising_edges(self, line: int) -> int:
        """How many times ``line`` went from low to high."""
        return sum(1 for e in self.events if e.line == line and e.level)

    def line(self, line: int, name: str = "") -> IrqLine:
        """A new line wired to this recorder."""
        return IrqLine(self, line, name)
