"""Replay a trace against fresh devices and say where they answer differently, sans-I/O.

:func:`replay` feeds a trace's events (:mod:`dispatcher.trace_records`) to a
machine, in order, and compares what the machine does with what the trace
recorded:

- :class:`~dispatcher.trace_records.Intercept`: the devices' clock moves to
  the event's ``virtual_ns``, then an :class:`~dispatcher.Engine` (no
  deadline) handles the frame; the completion it makes is compared, byte for
  byte, with the trace's next :class:`~dispatcher.trace_records.Completion`
  of that VP;
- :class:`~dispatcher.trace_records.ClockAdvance`: the clock moves, then the
  machine's ``poll()`` runs;
- :class:`~dispatcher.trace_records.Acknowledge`: the machine's interrupt
  acknowledge gives a vector, compared with the trace's;
- :class:`~dispatcher.trace_records.MemoryRead`: the bytes string I/O reads
  from guest memory come from the trace (in order, address and length
  compared); :class:`~dispatcher.trace_records.MemoryWrite`: what string
  I/O writes is compared;
- :class:`~dispatcher.trace_records.IrqEdge`: the edges the machine's
  interrupt lines make are compared with the trace's, in order (where the
  machine's lines can be found and the trace has edges; else informational).

A machine is a :class:`~dispatcher.Router`, or an object with a ``router``
and optionally ``poll()``, ``acknowledge() -> int | None`` (else its
``pic``'s, when it has one with ``pending_vector()``) and ``irq_lines`` (the
:class:`~dispatcher.IrqLine` objects whose edges count; without it, the
lines held by the devices behind the router's claims).

An allow entry with an ``index`` (:mod:`dispatcher.allow`) is checked
against the last value the trace's guest wrote to that index port before
the access: replay follows the OUTs to the ports such entries name.

Each intercept runs to its completion when it arrives: an async handler is
stepped in place and must finish without waiting for anything (one that
waits is a :class:`ReplayError`). String I/O under paging replays with
identity translation. The engine reports each failed access to the replay
(``Engine(on_failure=...)``) instead of logging it: failures are the replay's
results, not log lines.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .allow import AllowList
from .clock import SteppedClock
from .engine import Engine
from .errors import DispatchError, FrameError
from .guest import Guest, identity_translation
from .guest_memory import GuestMemory, MemoryRegion
from .irq import InterruptController, IrqLine, IrqRecorder, device_lines
from .port_io import MASK, Job, call_step
from .router import Router
from .trace import describe
from .trace_records import (
    Acknowledge,
    ClockAdvance,
    Completion,
    Intercept,
    IrqEdge,
    MemoryRead,
    MemoryWrite,
    TraceEvent,
)
from .wire import COMPLETION_SIZE, INTERCEPT_LEAN, Offset, Status, decode_completion, frame_ids

__all__ = [
    "DEFAULT_CONTEXT",
    "Divergence",
    "HandlerFailure",
    "ReplayError",
    "ReplayResult",
    "describe_event",
    "describe_intercept",
    "format_divergence",
    "intercept_access",
    "machine_router",
    "replay",
]

DEFAULT_CONTEXT: Final = 5
"""How many events before a divergence it keeps for printing."""

_FIELDS: Final = (
    "source_partition",
    "vp_index",
    "version",
    "status",
    "registers",
    "rip",
    "rax",
    "rcx",
    "rsi",
    "rdi",
    "port_number",
    "access_info",
    "detail",
)
_BOUNDARY: Final = (Intercept, ClockAdvance, Acknowledge)
_PORT_INFO_RAX: Final = struct.Struct("<HB5xQ")
"""PortNumber, AccessInfo and RAX, at Offset.PORT: what following an index port reads."""
_INDEX_END: Final = Offset.PORT + _PORT_INFO_RAX.size
_NO_INDEXES: Final[Mapping[int, int]] = {}


class ReplayError(DispatchError):
    """A trace that cannot be replayed as given; ``index`` is the event's place in it (from 0)."""

    def __init__(self, reason: str, *, index: int) -> None:
        super().__init__(f"event {index}: {reason}")
        self.reason = reason
        self.index = index


@dataclass(frozen=True, slots=True)
class Divergence:
    """Where the replayed machine did not do what the trace recorded.

    ``index`` is the trace event compared; ``kind`` is "completion",
    "acknowledge", "irq", "memory-read" or "memory-write"; ``expected`` and
    ``got`` describe both sides; ``fields`` names what differs (a
    completion's fields, "vector", "line", "level", "address", "data").
    ``port``/``size``/``is_write`` name the access (None where there is
    none); ``error`` is the exception a handler raised, if one did;
    ``allowed`` is the allow file's reason when the difference is accepted;
    ``context`` is the events before it, as (index, event).
    """

    index: int
    kind: str
    expected: str
    got: str
    fields: tuple[str, ...]
    virtual_ns: int
    port: int | None = None
    size: int = 0
    is_write: bool = False
    error: str | None = None
    allowed: str | None = None
    context: tuple[tuple[int, TraceEvent], ...] = ()
    subject: str = ""
    """The intercept a completion answers, in words (empty for other kinds)."""


@dataclass(frozen=True, slots=True)
class HandlerFailure:
    """Device code that failed in the replay: an intercept's handler (HANDLER_FAILED, ``error`` the exception's
    type; or DEADLINE_EXCEEDED), or a poll, timer or acknowledge (``port`` None) that raised."""

    index: int
    port: int | None
    is_write: bool
    status: Status
    error: str | None
    message: str


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a replay found. ``differences`` fail it; ``allowed`` do not."""

    replayed: int
    """Intercepts replayed."""
    differences: tuple[Divergence, ...]
    allowed: tuple[Divergence, ...]
    not_compared: int
    """Intercepts the trace has no completion for (it ended first, or it never recorded one)."""
    failures: tuple[HandlerFailure, ...]
    """Every intercept the replayed devices failed, in order (whether or not the trace agrees)."""
    irqs_compared: bool
    """Whether interrupt edges were compared (else the trace's edges were informational)."""

    @property
    def ok(self) -> bool:
        return not self.differences

    @property
    def summary(self) -> str:
        """The last line the ``replay`` command prints."""
        return f"replayed {self.replayed} intercepts, {len(self.differences)} differ"


def replay(
    events: Iterable[TraceEvent],
    machine: object,
    *,
    allow: AllowList | None = None,
    clock: SteppedClock | None = None,
    context: int = DEFAULT_CONTEXT,
    compare_irqs: bool | None = None,
    progress: Callable[[int], object] | None = None,
) -> ReplayResult:
    """Replay ``events`` against ``machine``; return what differed.

    ``clock`` is the devices' clock (the one the machine was built with),
    moved to each event's time; None for devices that read no clock.
    ``allow`` accepts listed differences. ``compare_irqs`` None compares
    interrupt edges when the trace has some and the machine's lines are
    found. ``progress(index)`` hears each intercept's event index before it
    runs (a parent watching for a hang). Raises :class:`ReplayError` for a
    trace that is not replayable (events out of time order, a completion
    with no intercept before it, an async handler that waits).
    """
    trace = events if isinstance(events, Sequence) else list(events)
    session = _Session(trace, machine, allow or AllowList(), clock, context, compare_irqs, progress)
    return session.run()


class _TraceMemory(GuestMemory):
    """Guest memory for replay: reads are served from the trace; writes are kept for comparing."""

    def __init__(self, session: _Session) -> None:
        self._session = session

    def regions(self) -> tuple[MemoryRegion, ...]:
        return (MemoryRegion(0, 1 << 64),)

    def check(self, address: int, length: int, *, write: bool = False) -> int:
        return 0

    def read(self, address: int, length: int) -> bytes:
        return self._session.memory_read(address, length)

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        self._session.memory_write(address, bytes(data))


def machine_router(machine: object) -> Router:
    """The router of a machine (a Router, or an object with a ``router``)."""
    if isinstance(machine, Router):
        return machine
    router = getattr(machine, "router", None)
    if not isinstance(router, Router):
        raise TypeError(f"{type(machine).__name__} is neither a Router nor an object with a router")
    return router


def _acknowledger(machine: object) -> Callable[[], int | None] | None:
    acknowledge = getattr(machine, "acknowledge", None)
    if callable(acknowledge):
        return acknowledge  # type: ignore[no-any-return]
    pic = getattr(machine, "pic", None)
    if isinstance(pic, InterruptController):

        def from_pic() -> int | None:
            return None if pic.pending_vector() is None else int(pic.acknowledge())

        return from_pic
    return None


def _irq_lines(machine: object, router: Router) -> list[IrqLine]:
    lines = getattr(machine, "irq_lines", None)
    return list(lines) if lines is not None else device_lines(router)


class _Session:
    """One replay's state."""

    def __init__(
        self,
        trace: Sequence[TraceEvent],
        machine: object,
        allow: AllowList,
        clock: SteppedClock | None,
        context: int,
        compare_irqs: bool | None,
        progress: Callable[[int], object] | None,
    ) -> None:
        self.trace = trace
        self.size = len(trace)
        self.machine = machine
        self.router = machine_router(machine)
        self.poll: Callable[[], object] | None = getattr(machine, "poll", None)
        self.acknowledge = _acknowledger(machine)
        self.allow = allow
        self.clock = clock
        self.context = context
        self.progress = progress
        self.errors: list[BaseException | None] = []
        """The exception of each failed access, as the engine reports it (in place of logging it)."""
        self.engine = Engine(
            self.router,
            deadline=None,
            guest=Guest(_TraceMemory(self), translate=identity_translation),
            on_failure=lambda status, error: self.errors.append(error),
        )
        self.differences: list[Divergence] = []
        self.allowed: list[Divergence] = []
        self.failures: list[HandlerFailure] = []
        # Per VP (partition, VP): (intercept index, completion made, error, index ports then) not yet compared.
        self.pending: dict[tuple[int, int], deque[tuple[int, bytes, BaseException | None, Mapping[int, int]]]] = {}
        # The last value written to each port an allow entry's index names. Replaced, never changed in
        # place, on each write, so a pending completion keeps what the index ports held before its access.
        self.index_ports = allow.index_ports
        self.indexes = _NO_INDEXES
        self.index = 0
        self.reads: deque[tuple[int, MemoryRead]] = deque()
        self.writes: deque[tuple[int, MemoryWrite]] = deque()
        self.edges = IrqRecorder()
        self.edges_seen = 0
        # Only the lines the trace follows are compared (a recording may tap some lines only).
        traced = {event.line for event in trace if type(event) is IrqEdge}
        lines = _irq_lines(machine, self.router) if compare_irqs or compare_irqs is None else []
        if traced:
            lines = [line for line in lines if line.line in traced]
        self.compare_irqs = bool(lines) and (compare_irqs if compare_irqs is not None else bool(traced))
        self.irq_lines = lines if self.compare_irqs else []
        self.edges_broken = False

    def run(self) -> ReplayResult:
        for line in self.irq_lines:
            self.edges.tap(line)
        replayed = 0
        try:
            handlers: dict[type, Callable[[int, Any], None]] = {
                Completion: self._completion,
                ClockAdvance: self._clock_advance,
                Acknowledge: self._acknowledge,
                IrqEdge: self._irq_edge,
                MemoryRead: self._memory_event,
                MemoryWrite: self._memory_event,
            }
            for index, event in enumerate(self.trace):
                self.index = index
                kind = type(event)
                if isinstance(event, Intercept):
                    self._intercept(index, event)
                    replayed += 1
                    continue
                handler = handlers.get(kind)
                if handler is None:
                    raise ReplayError(f"{event!r} is not a trace event", index=index)
                handler(index, event)
            self._end_edges()
        finally:
            for line in reversed(self.irq_lines):
                self.edges.untap(line)
        not_compared = sum(len(queue) for queue in self.pending.values())
        return ReplayResult(
            replayed,
            tuple(self.differences),
            tuple(self.allowed),
            not_compared,
            tuple(self.failures),
            self.compare_irqs,
        )

    # The events.

    def _move_clock(self, index: int, when: int) -> None:
        clock = self.clock
        if clock is None:
            return
        if when < clock.now_ns:
            raise ReplayError(f"virtual time {when} ns is before the previous event's {clock.now_ns} ns", index=index)
        try:
            clock.advance_to(when)
        except Exception as error:  # a timer of the machine's
            self._machine_failed(index, error)

    def _intercept(self, index: int, event: Intercept) -> None:
        self._move_clock(index, event.virtual_ns)
        trace = self.trace
        # The memory events after the intercept (up to the next intercept, clock advance or
        # acknowledge) are what its string I/O read and wrote.
        end, size = index + 1, self.size
        while end < size:
            item = trace[end]
            kind = type(item)
            if kind is Completion or kind is IrqEdge:
                pass
            elif kind is MemoryRead:
                self.reads.append((end, item))  # type: ignore[arg-type]
            elif kind is MemoryWrite:
                self.writes.append((end, item))  # type: ignore[arg-type]
            else:
                break
            end += 1
        if self.progress is not None:
            self.progress(index)
        logged = self.errors
        before = len(logged)
        frame = event.frame
        out, jobs = self.engine.receive((frame,))
        while jobs:
            job = jobs.pop()
            more_out, more_jobs = self._run_job(index, job)
            out.extend(more_out)
            jobs.extend(more_jobs)
        error = logged[-1] if len(logged) > before else None
        pending = self.pending
        indexes = self.indexes
        for completion in out:
            ids = frame_ids(completion)
            queue = pending.get(ids)
            if queue is None:
                queue = pending[ids] = deque()
            queue.append((index, completion, error, indexes))
            status = completion[Offset.COMPLETION_STATUS] if len(completion) >= COMPLETION_SIZE else 0
            if status == Status.HANDLER_FAILED or status == Status.DEADLINE_EXCEEDED:
                self._note_failure(index, event, Status(status), error)
        if self.reads or self.writes:
            self._end_memory(index)
        if self.index_ports and len(frame) >= _INDEX_END and frame[Offset.ACCESS_TYPE] == 1:
            self._index_written(frame)

    def _index_written(self, frame: bytes) -> None:
        port, info, rax = _PORT_INFO_RAX.unpack_from(frame, Offset.PORT)
        if port not in self.index_ports:
            return
        indexes = dict(self.indexes)
        if info & 0x08:
            indexes.pop(port, None)  # string I/O: the value written is in guest memory, so unknown here
        else:
            size = info & 7
            indexes[port] = rax & MASK[size] if size in (1, 2, 4) else rax
        self.indexes = indexes

    def _run_job(self, index: int, job: Job) -> tuple[list[bytes], list[Job]]:
        # An async handler runs in place; it may await only what is already done.
        results: list[object] = []
        status, error = Status.COMPLETED, None
        try:
            for step in job.steps:
                called = call_step(step)
                if step.claim is not None and step.claim.is_async:
                    called = _finish_now(called, index)
                results.append(called)
        except ReplayError:
            raise
        except Exception as exc:
            status, error = Status.HANDLER_FAILED, exc
        return self.engine.finish(job, results, status, error)

    def _completion(self, index: int, event: Completion) -> None:
        ids = frame_ids(event.frame)
        queue = self.pending.get(ids)
        if not queue:
            raise ReplayError(
                f"a completion for partition {ids[0]}, VP {ids[1]:#x} with no intercept before it", index=index
            )
        at, got, error, indexes = queue.popleft()
        if got == event.frame:
            return
        self._compare_completions(index, at, event, got, error, indexes)

    def _compare_completions(
        self, index: int, at: int, event: Completion, got: bytes, error: object, indexes: Mapping[int, int]
    ) -> None:
        try:
            expected_completion = decode_completion(event.frame)
        except FrameError as bad:
            raise ReplayError(f"the trace's completion is not valid: {bad}", index=index) from None
        got_completion = decode_completion(got)
        fields = tuple(name for name in _FIELDS if getattr(expected_completion, name) != getattr(got_completion, name))
        intercept = self.trace[at]
        assert type(intercept) is Intercept
        port, size, is_write = intercept_access(intercept.frame)
        expected_rax, got_rax = expected_completion.rax, got_completion.rax
        find = self.allow.find
        entry = find(port, size, is_write, fields, expected_rax, got_rax, indexes) if port is not None else None
        divergence = Divergence(
            index,
            "completion",
            _describe_completion(expected_completion, size),
            _describe_completion(got_completion, size),
            fields,
            event.virtual_ns,
            port,
            size,
            is_write,
            _error_text(error),
            entry.reason if entry is not None else None,
            self._context(index),
            describe_intercept(intercept.frame),
        )
        (self.allowed if entry is not None else self.differences).append(divergence)

    def _clock_advance(self, index: int, event: ClockAdvance) -> None:
        self._move_clock(index, event.virtual_ns)
        if self.poll is not None:
            try:
                self.poll()
            except Exception as error:
                self._machine_failed(index, error)

    def _acknowledge(self, index: int, event: Acknowledge) -> None:
        self._move_clock(index, event.virtual_ns)
        if self.acknowledge is None:
            raise ReplayError("the trace acknowledges an interrupt and the machine has no acknowledge()", index=index)
        try:
            vector = self.acknowledge()
        except Exception as error:
            self._machine_failed(index, error)
            return
        if vector != event.vector:
            self._diverge(index, "acknowledge", _vector(event.vector), _vector(vector), ("vector",), event.virtual_ns)

    def _irq_edge(self, index: int, event: IrqEdge) -> None:
        if not self.compare_irqs or self.edges_broken:
            return
        expected = (event.line, bool(event.level))
        made = self.edges.events
        if self.edges_seen == len(made):
            self._edge_divergence(index, event.virtual_ns, _edge(*expected), "no edge")
            return
        got = made[self.edges_seen][:2]
        self.edges_seen += 1
        if got != expected:
            self._edge_divergence(index, event.virtual_ns, _edge(*expected), _edge(*got))

    def _end_edges(self) -> None:
        made = self.edges.events
        if self.compare_irqs and not self.edges_broken and self.edges_seen < len(made):
            last = len(self.trace) - 1
            when = self.trace[last].virtual_ns if self.trace else 0
            self._edge_divergence(last, when, "no more edges", _edge(*made[self.edges_seen][:2]))

    def _edge_divergence(self, index: int, when: int, expected: str, got: str) -> None:
        # One edge out of step puts every later one out of step: compare no further.
        self.edges_broken = True
        self._diverge(index, "irq", expected, got, ("line", "level"), when)

    def _memory_event(self, index: int, event: MemoryRead | MemoryWrite) -> None:
        # Consumed by the intercept before it; one that follows no intercept belongs to nothing.
        for before in range(index - 1, -1, -1):
            kind = type(self.trace[before])
            if kind is Intercept:
                return
            if kind in _BOUNDARY:
                break
        raise ReplayError("guest memory accessed outside any intercept", index=index)

    # Guest memory, as string I/O reaches it.

    def memory_read(self, address: int, length: int) -> bytes:
        if not self.reads:
            self._diverge(
                self.index, "memory-read", "no read", f"{length} bytes at {address:#x}", ("address",), self._now()
            )
            return b"\xff" * length
        at, expected = self.reads.popleft()
        data = expected.data
        if expected.address != address or len(data) != length:
            fields = tuple(
                name
                for name, differs in (("address", expected.address != address), ("length", len(data) != length))
                if differs
            )
            self._diverge(
                at,
                "memory-read",
                f"{len(data)} bytes at {expected.address:#x}",
                f"{length} bytes at {address:#x}",
                fields,
                expected.virtual_ns,
            )
            data = (data + b"\xff" * length)[:length]
        return data

    def memory_write(self, address: int, data: bytes) -> None:
        if not self.writes:
            self._diverge(
                self.index, "memory-write", "no write", _bytes(address, data), ("address", "data"), self._now()
            )
            return
        at, expected = self.writes.popleft()
        if expected.address != address or expected.data != data:
            fields = tuple(
                name
                for name, differs in (("address", expected.address != address), ("data", expected.data != data))
                if differs
            )
            self._diverge(
                at, "memory-write", _bytes(expected.address, expected.data), _bytes(address, data), fields,
                expected.virtual_ns,
            )  # fmt: skip

    def _end_memory(self, index: int) -> None:
        for at, read in self.reads:
            self._diverge(at, "memory-read", f"{len(read.data)} bytes at {read.address:#x}", "no read", ("address",),
                          read.virtual_ns)  # fmt: skip
        for at, write in self.writes:
            self._diverge(at, "memory-write", _bytes(write.address, write.data), "no write", ("address", "data"),
                          write.virtual_ns)  # fmt: skip
        self.reads.clear()
        self.writes.clear()

    # Helpers.

    def _now(self) -> int:
        return self.clock.now_ns if self.clock is not None else self.trace[self.index].virtual_ns

    def _diverge(self, index: int, kind: str, expected: str, got: str, fields: tuple[str, ...], when: int) -> None:
        self.differences.append(Divergence(index, kind, expected, got, fields, when, context=self._context(index)))

    def _context(self, index: int) -> tuple[tuple[int, TraceEvent], ...]:
        start = max(0, index - self.context)
        return tuple((i, self.trace[i]) for i in range(start, index + 1))

    def _machine_failed(self, index: int, error: Exception) -> None:
        # Device code outside any intercept raised: a failure of the machine, at no port.
        self.failures.append(
            HandlerFailure(index, None, False, Status.HANDLER_FAILED, type(error).__name__, str(error))
        )

    def _note_failure(self, index: int, event: Intercept, status: Status, error: BaseException | None) -> None:
        port, _, is_write = intercept_access(event.frame)
        self.failures.append(
            HandlerFailure(
                index,
                port,
                is_write,
                status,
                type(error).__name__ if error is not None else None,
                str(error) if error is not None else status.name,
            )
        )


def _finish_now(awaitable: object, index: int) -> object:
    # Step the coroutine: replay has no event loop, so anything it waits on is a trace it cannot replay.
    coroutine = awaitable.__await__()  # type: ignore[attr-defined]
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    close = getattr(coroutine, "close", None)
    if close is not None:
        close()
    raise ReplayError("an async handler waited for something; replay runs only those that finish at once", index=index)


def intercept_access(frame: bytes) -> tuple[int | None, int, bool]:
    """(port, size, is_write) of an intercept frame; port None when the frame is too short to say."""
    try:
        fields = INTERCEPT_LEAN.unpack_from(frame)
    except Exception:
        return None, 0, False
    return fields[13], fields[14] & 7, fields[8] == 1


def _error_text(error: object) -> str | None:
    if error is None:
        return None
    return f"{type(error).__name__}: {error}"


def _vector(vector: int | None) -> str:
    return "no interrupt" if vector is None else f"vector {vector:#x}"


def _edge(line: int, level: bool) -> str:
    return f"IRQ{line} {'raised' if level else 'lowered'}"


def _bytes(address: int, data: bytes) -> str:
    shown = data[:16].hex(" ")
    return f"{len(data)} bytes at {address:#x}: {shown}{' ...' if len(data) > 16 else ''}"


def _describe_completion(completion: Any, size: int) -> str:
    status = completion.status.name
    mask = MASK[size] if size in (1, 2, 4) else 0xFFFF_FFFF
    parts = [status, f"rax={completion.rax & mask:#x}", f"rip={completion.rip:#x}"]
    if completion.rcx or completion.rsi or completion.rdi:
        parts.append(f"rcx={completion.rcx:#x} rsi={completion.rsi:#x} rdi={completion.rdi:#x}")
    if completion.detail:
        parts.append(f"detail={completion.detail:#x}")
    return " ".join(parts)


_SIZES: Final = {1: "b", 2: "w", 4: "d"}


def describe_intercept(frame: bytes) -> str:
    """An intercept frame in a few words: ``OUT 0x70 (1 byte) 0x8f``, ``IN 0x71 (2 bytes)``, ``REP INSW 0x1f0``."""
    try:
        fields = INTERCEPT_LEAN.unpack_from(frame)
    except Exception:
        return f"a malformed intercept ({len(frame)} bytes)"
    vp, is_write, port, access_info, rax = fields[6], fields[8] == 1, fields[13], fields[14], fields[17]
    size = access_info & 7
    if access_info & 0x08:
        name = ("REP " if access_info & 0x10 else "") + ("OUTS" if is_write else "INS") + _SIZES.get(size, "?").upper()
        text = f"{name} {port:#x}"
    else:
        plural = "byte" if size == 1 else "bytes"
        text = f"{'OUT' if is_write else 'IN'} {port:#x} ({size} {plural})"
        if is_write:
            text += f" {rax & MASK[size] if size in (1, 2, 4) else rax:#x}"
    return f"{text} VP {vp}" if vp else text


def describe_event(event: TraceEvent) -> str:
    """One event in a line, for people: the devices' clock (ms), then :func:`dispatcher.trace.describe`."""
    return f"{event.virtual_ns / 1e6:12.6f} ms  {describe(event)}"


def format_divergence(divergence: Divergence) -> str:
    """A divergence for people: what differs, both sides, the error raised and the events before it."""
    what = divergence.kind + (f" of {divergence.subject}" if divergence.subject else "")
    lines = [
        f"event {divergence.index} at {divergence.virtual_ns / 1e6:.6f} ms: {what} differs"
        + (f" ({', '.join(divergence.fields)})" if divergence.fields else ""),
        f"  expected: {divergence.expected}",
        f"  got:      {divergence.got}",
    ]
    if divergence.error is not None:
        lines.append(f"  raised:   {divergence.error}")
    if divergence.allowed is not None:
        lines.append(f"  allowed:  {divergence.allowed}")
    if divergence.context:
        lines.append("  context:")
        for index, event in divergence.context:
            marker = ">" if index == divergence.index else " "
            lines.append(f"  {marker}{index:>8}  {describe_event(event)}")
    return "\n".join(lines)
