"""The events a trace holds: what a VM's devices were asked, what they answered, and what else moved them.

A trace is the sequence of everything that reached a VM's device code, in
the order it ran (under the VM's device lock), so that a replay against
fresh devices repeats it exactly:

- :class:`Intercept`: an intercept frame, as the dispatcher received it;
- :class:`Completion`: the completion frame it sent for it;
- :class:`MemoryRead` / :class:`MemoryWrite`: guest memory that string I/O
  read or wrote while serving the intercept before them;
- :class:`ClockAdvance`: the devices' clock moved to this time (timers due
  by then ran);
- :class:`Acknowledge`: the machine ran the interrupt acknowledge cycle and
  got this vector (None: nothing pending);
- :class:`IrqEdge`: an interrupt line changed level.

Every event carries ``virtual_ns``, the devices' clock when it happened
(nanoseconds from the trace's start), and ``real_ns``, the host's monotonic
clock then (nanoseconds from the trace's start), for people reading it.
"""

from __future__ import annotations

from typing import NamedTuple, TypeAlias

__all__ = [
    "Acknowledge",
    "ClockAdvance",
    "Completion",
    "Intercept",
    "IrqEdge",
    "MemoryRead",
    "MemoryWrite",
    "TraceEvent",
]


class Intercept(NamedTuple):
    """An intercept frame as received."""

    virtual_ns: int
    real_ns: int
    frame: bytes


class Completion(NamedTuple):
    """The completion frame sent for the VP's last intercept."""

    virtual_ns: int
    real_ns: int
    frame: bytes


class MemoryRead(NamedTuple):
    """Guest-physical bytes string I/O read (an OUTS's source)."""

    virtual_ns: int
    real_ns: int
    address: int
    data: bytes


class MemoryWrite(NamedTuple):
    """Guest-physical bytes string I/O wrote (an INS's destination)."""

    virtual_ns: int
    real_ns: int
    address: int
    data: bytes


class ClockAdvance(NamedTuple):
    """The devices' clock moved to ``virtual_ns``; timers due by then ran."""

    virtual_ns: int
    real_ns: int


class Acknowledge(NamedTuple):
    """The interrupt acknowledge cycle ran and gave ``vector`` (None: no interrupt was pending)."""

    virtual_ns: int
    real_ns: int
    vector: int | None


class IrqEdge(NamedTuple):
    """Interrupt line ``line`` went to ``level``."""

    virtual_ns: int
    real_ns: int
    line: int
    level: bool


TraceEvent: TypeAlias = Intercept | Completion | MemoryRead | MemoryWrite | ClockAdvance | Acknowledge | IrqEdge
