"""Shrinking a failing trace to the few events that still fail the same way: delta debugging, sans-I/O.

:func:`ddmin` is Zeller's algorithm over any list and a predicate ("does
this subset still fail?"); it returns a 1-minimal subset (removing any one
item makes the failure go away). :func:`trace_units` cuts a trace into the
pieces it removes: an intercept with everything that belongs to it (the
clock advances and acknowledges just before it, the memory its string I/O
touched, its completion, the interrupt edges it caused), so a candidate is
always a well-formed trace. :func:`failure_of` and :func:`same_failure`
name how a replay failed and whether a candidate's replay failed the same
way; running the candidates (in a child process, so that a hang can be
stopped) is the caller's business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

from .replay import ReplayResult, intercept_access
from .trace_records import Acknowledge, ClockAdvance, Intercept, TraceEvent

__all__ = ["Failure", "ddmin", "failure_of", "flatten", "intercept_ports", "same_failure", "trace_units"]

T = TypeVar("T")


class Failure(NamedTuple):
    """How a replay failed: ``kind`` "raise" (a handler raised: ``detail`` is the exception's type, or
    the status), "hang" (the replay did not finish in time), or "diverge" (``detail`` is the
    divergence's kind); ``port`` is the access where it happened (None where there is none)."""

    kind: str
    port: int | None
    detail: str

    def __str__(self) -> str:
        where = f" at port {self.port:#x}" if self.port is not None else ""
        if self.kind == "raise":
            return f"a handler raised {self.detail}{where}"
        if self.kind == "hang":
            return f"a handler hung{where}"
        return f"a {self.detail} difference{where}"


def failure_of(result: ReplayResult) -> Failure | None:
    """The first failure of a replay: a handler's failure first, else the first difference; None if it passed."""
    if result.failures:
        first = result.failures[0]
        return Failure("raise", first.port, first.error or first.status.name)
    if result.differences:
        difference = result.differences[0]
        return Failure("diverge", difference.port, difference.kind)
    return None


def same_failure(result: ReplayResult, target: Failure) -> bool:
    """Whether ``result`` shows ``target``'s failure: same kind, same port, same exception type or difference kind."""
    if target.kind == "raise":
        return any(f.port == target.port and (f.error or f.status.name) == target.detail for f in result.failures)
    if target.kind == "diverge":
        return any(d.port == target.port and d.kind == target.detail for d in result.differences)
    return False


def trace_units(events: Sequence[TraceEvent]) -> list[list[TraceEvent]]:
    """``events`` cut into removable pieces, each holding at most one intercept (see the module's description)."""
    units: list[list[TraceEvent]] = []
    current: list[TraceEvent] = []
    has_intercept = False
    for event in events:
        kind = type(event)
        if has_intercept and (kind is Intercept or kind is ClockAdvance or kind is Acknowledge):
            units.append(current)
            current, has_intercept = [], False
        current.append(event)
        has_intercept = has_intercept or kind is Intercept
    if current:
        units.append(current)
    return units


def flatten(units: Sequence[Sequence[TraceEvent]]) -> list[TraceEvent]:
    """The events of ``units``, in order."""
    return [event for unit in units for event in unit]


def intercept_ports(units: Sequence[Sequence[TraceEvent]]) -> set[int]:
    """The ports the intercepts of ``units`` access."""
    ports = set()
    for unit in units:
        for event in unit:
            if type(event) is Intercept:
                port = intercept_access(event.frame)[0]
                if port is not None:
                    ports.add(port)
    return ports


def ddmin(items: Sequence[T], fails: Callable[[list[T]], bool]) -> list[T]:
    """A 1-minimal subset of ``items`` for which ``fails`` holds (``fails(list(items))`` is assumed).

    Zeller and Hildebrandt's ddmin: try each of n chunks, then each
    complement; on success restart from the smaller list, else double n.
    Each distinct subset is tested once; order is kept.
    """
    tested: dict[tuple[int, ...], bool] = {}

    def check(indices: list[int]) -> bool:
        key = tuple(indices)
        known = tested.get(key)
        if known is None:
            known = tested[key] = fails([items[i] for i in indices])
        return known

    current = list(range(len(items)))
    n = 2
    while len(current) >= 2:
        chunks = _split(current, n)
        reduced = False
        for chunk in chunks:
            if check(chunk):
                current, n, reduced = chunk, 2, True
                break
        if not reduced and n > 2:
            for i in range(len(chunks)):
                complement = [index for j, chunk in enumerate(chunks) if j != i for index in chunk]
                if check(complement):
                    current, n, reduced = complement, max(n - 1, 2), True
                    break
        if not reduced:
            if n >= len(current):
                break
            n = min(len(current), 2 * n)
    if len(current) == 1 and check([]):
        current = []
    return [items[i] for i in current]


def _split(indices: list[int], n: int) -> list[list[int]]:
    # n chunks as even as can be, in order.
    size, extra = divmod(len(indices), n)
    chunks, start = [], 0
    for k in range(n):
        end = start + size + (1 if k < extra else 0)
        chunks.append(indices[start:end])
        start = end
    return [chunk for chunk in chunks if chunk]
