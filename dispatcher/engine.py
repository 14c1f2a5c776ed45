"""The dispatch decisions, sans-I/O: intercept frames in, completion frames out.

The :class:`Engine` decodes each frame, routes it through a :class:`Router`,
runs synchronous handlers inline and returns the completion bytes. String
I/O (INS/OUTS) moves a bounded chunk per intercept through guest memory
(see :mod:`dispatcher.string_io`). Work that
must be awaited (an async handler) comes back as a :class:`Job` for the I/O
layer to run; the layer reports the outcome with :meth:`Engine.finish`. The
engine keeps the per-VP order: while a VP has a job outstanding, its later
intercepts wait in a queue. Nothing here imports anyio or touches a socket.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple, cast

from .completion import COMPLETION, COMPLETION_SIZE, COMPLETION_STRUCT, PROTOCOL_VERSION, UNKNOWN_VP, Registers, Status
from .errors import FrameError, GuestMemoryError
from .guest_memory import GuestMemory, MemoryFault
from .message import (
    HEADER_SIZE,
    IO_PORT_INTERCEPT,
    IO_PORT_PAYLOAD_SIZE,
    MAX_PAYLOAD,
    SLOT_SIZE,
    VALID_ACCESS_INFO,
    check_header,
    check_io_payload,
)
from .router import PORT_LIMIT, BulkAccess, BulkClaim, Claim, PortAccess, Router
from .string_io import (
    DEFAULT_MAX_ELEMENTS,
    Refusal,
    SegmentSource,
    StringPlan,
    Translate,
    gather,
    pack_elements,
    plan_string,
    scatter,
    unpack_elements,
)

__all__ = ["Engine", "EngineStats", "Job", "Step", "call_step"]

log = logging.getLogger("dispatcher")

# The fields the dispatch decision needs, up to and including RAX; the CS
# base, limit and selector are skipped, its attributes give the code size.
_LEAN = struct.Struct("<I4BQ" "IBBH" "14xH" "QQ" "HBBI" "Q")  # fmt: skip
_MASK = (0, 0xFF, 0xFFFF, 0, 0xFFFF_FFFF)
_KEEP = (0, ~0xFF & (1 << 64) - 1, ~0xFFFF & (1 << 64) - 1, 0, 0)
_KNOWN = frozenset({IO_PORT_INTERCEPT})
_PAYLOAD = COMPLETION_SIZE - HEADER_SIZE
_pack = COMPLETION_STRUCT.pack
_FRAME_MIN = HEADER_SIZE + IO_PORT_PAYLOAD_SIZE
# Indexed by AccessType << 8 | AccessInfo: what the inline path takes, a
# read or write whose AccessInfo is valid and not a string operation.
_SIMPLE_ACCESS = tuple(key >> 8 <= 1 and VALID_ACCESS_INFO[key & 0xFF] and not key & 0x08 for key in range(0x10000))
_RIP = int(Registers.RIP)
_RIP_RAX = int(Registers.RIP | Registers.RAX)


class Step(NamedTuple):
    """One handler call of an access (``claim`` is None for an unclaimed part).

    A string access's bulk handler gets a step of a BulkClaim and a BulkAccess.
    """

    claim: Claim | BulkClaim | None
    access: PortAccess | BulkAccess
    shift: int


def call_step(step: Step) -> object:
    """Call a step's handler; for an async handler, the result is the awaitable to await."""
    claim = step.claim
    # A step always pairs a claim with the access type its handler takes.
    return None if claim is None else cast("Callable[[object], object]", claim.handler)(step.access)


@dataclass(slots=True, eq=False)
class Job:
    """An intercept whose handlers must be awaited. ``steps`` run in order.

    For string I/O, ``string`` is the chunk's plan.
    """

    key: int
    steps: list[Step]
    partition: int
    vp_index: int
    port: int
    access_info: int
    is_write: bool
    rax: int
    next_rip: int
    string: StringPlan | None = None


class EngineStats:
    """Counters since the engine started, shareable by several engines.

    Counts are kept per port in a flat list because incrementing one is
    the cheapest bookkeeping the hot path can do; totals are derived.
    """

    __slots__ = (
        "deadline_exceeded",
        "handler_failed",
        "memory_errors",
        "port_counts",
        "protocol_errors",
        "unclaimed_reads",
        "unclaimed_writes",
        "unsupported",
    )

    def __init__(self) -> None:
        self.port_counts = [0] * PORT_LIMIT
        self.handler_failed = 0
        self.deadline_exceeded = 0
        self.protocol_errors = 0
        self.unsupported = 0
        self.memory_errors = 0
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0

    @property
    def intercepts(self) -> int:
        """Well-formed intercepts received (malformed frames are ``protocol_errors``)."""
        return sum(self.port_counts)

    @property
    def completed(self) -> int:
        """Intercepts completed with status COMPLETED."""
        return self.intercepts - self.handler_failed - self.deadline_exceeded - self.unsupported - self.memory_errors

    @property
    def per_port(self) -> Counter[int]:
        return Counter({port: n for port, n in enumerate(self.port_counts) if n})


def _next_rip(rip: int, length: int, state: int, cs_attributes: int) -> int:
    # IP wraps at the code segment's size: 64-bit code in long mode (EFER.LMA
    # and CS.L), else 32-bit when CS.D is set, else 16-bit.
    if state & 0x10 and cs_attributes & 0x2000:
        return (rip + length) & 0xFFFF_FFFF_FFFF_FFFF
    if cs_attributes & 0x4000:
        return (rip + length) & 0xFFFF_FFFF
    return (rip + length) & 0xFFFF


class Engine:
    """Sans-I/O dispatch over one connection's stream of intercept frames.

    ``deadline`` (seconds, or None) bounds a handler: a synchronous handler
    cannot be interrupted, so one that returns after the deadline has its
    result discarded; an async one is cancelled by the I/O layer. Either way
    the VP gets a DEADLINE_EXCEEDED completion.

    ``memory`` is the guest memory string I/O reads and writes (without it a
    string access gets UNSUPPORTED); ``max_elements`` bounds the elements one
    intercept moves; ``translate`` and ``segments`` are the hooks described
    in :mod:`dispatcher.string_io`.
    """

    def __init__(
        self,
        router: Router,
        *,
        deadline: float | None = 5.0,
        clock: Callable[[], float] = time.perf_counter,
        stats: EngineStats | None = None,
        memory: GuestMemory | None = None,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        translate: Translate | None = None,
        segments: SegmentSource | None = None,
    ) -> None:
        if max_elements < 1:
            raise ValueError(f"max_elements must be at least 1, not {max_elements}")
        self.router = router
        self.deadline = deadline
        self.stats = stats if stats is not None else EngineStats()
        self.memory = memory
        self.max_elements = max_elements
        self.translate = translate
        self.segments = segments
        self._clock = clock
        self._waiting: dict[int, deque[bytes]] = {}

    @property
    def busy(self) -> bool:
        """True while some VP has a job outstanding."""
        return bool(self._waiting)

    def receive(self, frames: Iterable[bytes]) -> tuple[list[bytes], list[Job]]:
        """Take a batch of frames; return completions ready now and jobs to run."""
        out: list[bytes] = []
        jobs: list[Job] = []
        append = out.append
        process = self._process
        read_table, write_table = self.router.read_table, self.router.write_table
        counts = self.stats.port_counts
        waiting = self._waiting
        clock, deadline = self._clock, self.deadline
        last = clock()
        # Module globals as locals: this loop is the hot path.
        # tuple.__new__ skips the NamedTuple's Python-level __new__, a third of its cost.
        unpack, pack, port_access, new_tuple = _LEAN.unpack_from, _pack, PortAccess, tuple.__new__
        io_type, min_payload, frame_min, slot = IO_PORT_INTERCEPT, IO_PORT_PAYLOAD_SIZE, _FRAME_MIN, SLOT_SIZE
        simple_access, mask, keep = _SIMPLE_ACCESS, _MASK, _KEEP
        completion, payload, version, rip_only, rip_rax = COMPLETION, _PAYLOAD, PROTOCOL_VERSION, _RIP, _RIP_RAX
        for frame in frames:
            # The common case, inline: a well-formed, non-string access wholly
            # inside one synchronous claim, for a VP with nothing queued. It
            # must produce exactly what _process would; anything else goes there.
            try:
                (
                    mtype,
                    b4,
                    _b5,
                    _b6,
                    _b7,
                    partition,
                    vp,
                    length_cr8,
                    access_type,
                    state,
                    cs_attributes,
                    rip,
                    _rflags,
                    port,
                    access_info,
                    byte_count,
                    _reserved,
                    rax,
                ) = unpack(frame)
            except struct.error:
                process(frame, out)
                continue
            size = access_info & 7
            claim = (write_table if access_type else read_table)[port]
            if (
                claim is None
                or claim.is_async
                or claim.last < port + size - 1
                or size > claim.max_size
                or b4 != min_payload
                or mtype != io_type
                or not frame_min <= len(frame) <= slot
                or not simple_access[access_type << 8 | access_info]
                or byte_count > 16
                or (waiting and (partition << 32 | vp) in waiting)
            ):
                job = process(frame, out)
                if job is not None:
                    jobs.append(job)
                last = clock()
                continue
            counts[port] += 1
            if state & 0x10 and cs_attributes & 0x2000:
                next_rip = (rip + (length_cr8 & 0xF)) & 0xFFFF_FFFF_FFFF_FFFF
            elif cs_attributes & 0x4000:
                next_rip = (rip + (length_cr8 & 0xF)) & 0xFFFF_FFFF
            else:
                next_rip = (rip + (length_cr8 & 0xF)) & 0xFFFF
            is_write = access_type == 1
            access = new_tuple(
                port_access,
                (port, size, is_write, rax & mask[size] if is_write else 0, port - claim.first, vp, partition),
            )
            try:
                result = claim.handler(access)
            except Exception as error:
                append(
                    self._fail(
                        partition,
                        vp,
                        port,
                        access_info,
                        is_write,
                        rax,
                        next_rip,
                        Status.HANDLER_FAILED,
                        error,
                        [Step(claim, access, 0)],
                    )
                )
                last = clock()
                continue
            # One clock read per frame: the time since the previous one is this
            # handler's run plus a few microseconds of our own bookkeeping.
            now = clock()
            elapsed, last = now - last, now
            if deadline is not None and elapsed > deadline:
                append(
                    self._fail(
                        partition,
                        vp,
                        port,
                        access_info,
                        is_write,
                        rax,
                        next_rip,
                        Status.DEADLINE_EXCEEDED,
                        None,
                        [Step(claim, access, 0)],
                    )
                )
            elif is_write:
                append(
                    pack(
                        completion,
                        payload,
                        0,
                        0,
                        0,
                        partition,
                        vp,
                        version,
                        0,
                        rip_only,
                        next_rip,
                        rax,
                        0,
                        0,
                        0,
                        port,
                        access_info,
                        0,
                        0,
                    )
                )
            elif type(result) is int:
                append(
                    pack(
                        completion,
                        payload,
                        0,
                        0,
                        0,
                        partition,
                        vp,
                        version,
                        0,
                        rip_rax,
                        next_rip,
                        (rax & keep[size]) | (result & mask[size]),
                        0,
                        0,
                        0,
                        port,
                        access_info,
                        0,
                        0,
                    )
                )
            else:
                append(
                    self._complete(
                        partition, vp, port, access_info, is_write, rax, next_rip, [Step(claim, access, 0)], [result]
                    )
                )
        return out, jobs

    def finish(
        self,
        job: Job,
        results: list[object] | None,
        status: Status = Status.COMPLETED,
        error: BaseException | None = None,
    ) -> tuple[list[bytes], list[Job]]:
        """Report a job's outcome; return its completion and whatever that VP may run next.

        ``results`` holds each step's handler return value (None for
        unclaimed steps) when ``status`` is COMPLETED.
        """
        out: list[bytes] = []
        if job.string is not None:
            steps = job.steps  # one element's steps repeated, or one bulk step
            template = steps if isinstance(steps[0].claim, BulkClaim) else steps[: len(steps) // job.string.elements]
            out.append(self._finish_string(job.string, template, results or [], status, error))
        elif status is Status.COMPLETED and results is not None:
            out.append(
                self._complete(
                    job.partition,
                    job.vp_index,
                    job.port,
                    job.access_info,
                    job.is_write,
                    job.rax,
                    job.next_rip,
                    job.steps,
                    results,
                )
            )
        else:
            out.append(
                self._fail(
                    job.partition,
                    job.vp_index,
                    job.port,
                    job.access_info,
                    job.is_write,
                    job.rax,
                    job.next_rip,
                    status,
                    error,
                    job.steps,
                )
            )
        queue = self._waiting[job.key]
        while queue:
            next_job = self._process(queue.popleft(), out, queued=True)
            if next_job is not None:
                return out, [next_job]
        del self._waiting[job.key]
        return out, []

    def _process(self, frame: bytes, out: list[bytes], queued: bool = False) -> Job | None:
        stats = self.stats
        try:
            (
                mtype,
                b4,
                _b5,
                _b6,
                _b7,
                partition,
                vp,
                length_cr8,
                access_type,
                state,
                cs_attributes,
                rip,
                _rflags,
                port,
                access_info,
                byte_count,
                _reserved,
                rax,
            ) = _LEAN.unpack_from(frame)
        except struct.error:
            # Too short to hold the fields above: the precise check names the gap.
            self._reject(frame, out)
            return None
        n = len(frame)
        # The quick test passes every common frame; the precise one decides the rest
        # (a seed-layout header, say).
        quick_ok = (
            mtype == IO_PORT_INTERCEPT
            and IO_PORT_PAYLOAD_SIZE <= b4 <= MAX_PAYLOAD
            and HEADER_SIZE + b4 <= n <= SLOT_SIZE
            and access_type <= 1
            and VALID_ACCESS_INFO[access_info]
            and byte_count <= 16
        )
        if not quick_ok and first_error(frame) is not None:
            self._reject(frame, out)
            return None
        key = partition << 32 | vp
        if not queued:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.append(frame)
                return None
        if access_info & 0x08:
            return self._string(frame, out, key)
        stats.port_counts[port] += 1
        next_rip = _next_rip(rip, length_cr8 & 0xF, state, cs_attributes)
        size = access_info & 7
        is_write = access_type == 1
        claim = (self.router.write_table if is_write else self.router.read_table)[port]
        if claim is not None and claim.last >= port + size - 1 and size <= claim.max_size:
            steps = [
                Step(
                    claim,
                    PortAccess(
                        port, size, is_write, rax & _MASK[size] if is_write else 0, port - claim.first, vp, partition
                    ),
                    0,
                )
            ]
        else:
            steps = self._split(port, size, is_write, rax, vp, partition)
        if any(step.claim is not None and step.claim.is_async for step in steps):
            self._waiting[key] = deque()
            return Job(key, steps, partition, vp, port, access_info, is_write, rax, next_rip)
        results: list[object] = []
        clock = self._clock
        started = clock()
        try:
            for step in steps:
                results.append(call_step(step))
        except Exception as error:
            out.append(
                self._fail(
                    partition, vp, port, access_info, is_write, rax, next_rip, Status.HANDLER_FAILED, error, steps
                )
            )
            return None
        if self.deadline is not None and clock() - started > self.deadline:
            out.append(
                self._fail(
                    partition, vp, port, access_info, is_write, rax, next_rip, Status.DEADLINE_EXCEEDED, None, steps
                )
            )
            return None
        out.append(self._complete(partition, vp, port, access_info, is_write, rax, next_rip, steps, results))
        return None

    def _split(self, port: int, size: int, is_write: bool, rax: int, vp: int, partition: int) -> list[Step]:
        # Straddling, partly unclaimed or wider than the claim takes: one byte
        # access per port, combined little-endian. Wholly unclaimed: one
        # unclaimed step.
        table = self.router.write_table if is_write else self.router.read_table
        claims = [table[port + i] for i in range(size)]
        if all(c is None for c in claims):
            return [Step(None, PortAccess(port, size, is_write, rax & _MASK[size], 0, vp, partition), 0)]
        return [
            Step(
                c,
                PortAccess(
                    port + i,
                    1,
                    is_write,
                    rax >> 8 * i & 0xFF,
                    port + i - c.first if c is not None else 0,
                    vp,
                    partition,
                ),
                8 * i,
            )
            for i, c in enumerate(claims)
        ]

    def _complete(
        self,
        partition: int,
        vp: int,
        port: int,
        access_info: int,
        is_write: bool,
        rax: int,
        next_rip: int,
        steps: list[Step],
        results: list[object],
    ) -> bytes:
        stats = self.stats
        if is_write:
            for step in steps:
                if step.claim is None:
                    stats.unclaimed_writes += 1
            return _pack(
                COMPLETION,
                _PAYLOAD,
                0,
                0,
                0,
                partition,
                vp,
                PROTOCOL_VERSION,
                0,
                _RIP,
                next_rip,
                rax,
                0,
                0,
                0,
                port,
                access_info,
                0,
                0,
            )
        value = 0
        for step, result in zip(steps, results, strict=True):
            mask = _MASK[step.access.size]
            if step.claim is None:
                stats.unclaimed_reads += 1
                value |= mask << step.shift
            elif type(result) is int or isinstance(result, int):
                value |= (result & mask) << step.shift
            else:
                error = TypeError(f"a read handler returned {result!r}, not an int")
                return self._fail(
                    partition, vp, port, access_info, is_write, rax, next_rip, Status.HANDLER_FAILED, error, steps
                )
        size = access_info & 7
        return _pack(
            COMPLETION,
            _PAYLOAD,
            0,
            0,
            0,
            partition,
            vp,
            PROTOCOL_VERSION,
            0,
            _RIP_RAX,
            next_rip,
            (rax & _KEEP[size]) | value,
            0,
            0,
            0,
            port,
            access_info,
            0,
            0,
        )

    def _fail(
        self,
        partition: int,
        vp: int,
        port: int,
        access_info: int,
        is_write: bool,
        rax: int,
        next_rip: int,
        status: Status,
        error: BaseException | None,
        steps: list[Step],
    ) -> bytes:
        # The instruction still completes, as on hardware with a dead device:
        # a read gets all ones, a write is dropped.
        self._note_failure(partition, vp, port, access_info, is_write, status, error, steps)
        size = access_info & 7
        if is_write:
            return _pack(
                COMPLETION,
                _PAYLOAD,
                0,
                0,
                0,
                partition,
                vp,
                PROTOCOL_VERSION,
                status,
                _RIP,
                next_rip,
                rax,
                0,
                0,
                0,
                port,
                access_info,
                0,
                0,
            )
        return _pack(
            COMPLETION,
            _PAYLOAD,
            0,
            0,
            0,
            partition,
            vp,
            PROTOCOL_VERSION,
            status,
            _RIP_RAX,
            next_rip,
            (rax & _KEEP[size]) | _MASK[size],
            0,
            0,
            0,
            port,
            access_info,
            0,
            0,
        )

    def _note_failure(
        self,
        partition: int,
        vp: int,
        port: int,
        access_info: int,
        is_write: bool,
        status: Status,
        error: BaseException | None,
        steps: list[Step],
    ) -> None:
        stats = self.stats
        if status is Status.DEADLINE_EXCEEDED:
            stats.deadline_exceeded += 1
        else:
            stats.handler_failed += 1
        names = ", ".join(sorted({s.claim.name for s in steps if s.claim is not None}))
        log.error(
            "%s on port %#x (%s, %d bytes) by %s, partition %d, VP %d",
            "handler failed" if status is Status.HANDLER_FAILED else "deadline exceeded",
            port,
            "write" if is_write else "read",
            access_info & 7,
            names,
            partition,
            vp,
            exc_info=error,
        )

    def _string(self, frame: bytes, out: list[bytes], key: int) -> Job | None:
        # String I/O: plan the chunk, then call the port's bulk handler once or
        # its handler per element; async handlers make a Job.
        plan = plan_string(frame, self.memory, self.max_elements, self.translate, self.segments)
        stats = self.stats
        if isinstance(plan, Refusal):
            if plan.status is Status.PROTOCOL_ERROR:
                stats.protocol_errors += 1
            else:
                stats.port_counts[plan.port] += 1
                if plan.status is Status.UNSUPPORTED:
                    stats.unsupported += 1
                else:
                    stats.memory_errors += 1
            log.warning(
                "string access to port %#x by partition %d, VP %d: %s: %s",
                plan.port,
                plan.partition,
                plan.vp_index,
                plan.status.name,
                plan.reason,
            )
            out.append(plan.completion)
            return None
        _, partition, vp, port, _, is_write, size, count, *_ = plan
        stats.port_counts[port] += 1
        if not count:
            out.append(plan.completion())
            return None
        router = self.router
        if is_write:
            claim, bulk, data = router.write_table[port], router.bulk_write_table.get(port), gather(plan)
        else:
            claim, bulk, data = router.read_table[port], router.bulk_read_table.get(port), b""
        if claim is None:
            bulk = None
        template: list[Step]
        new = tuple.__new__  # skips the NamedTuples' Python-level __new__
        deadline = self.deadline
        if bulk is not None:
            chunk = new(BulkAccess, (port, size, count, is_write, data, port - bulk.first, vp, partition))
            is_async = bulk.is_async
            if not is_async:
                # The bulk fast path: one call moves the chunk.
                started = self._clock() if deadline is not None else 0.0
                try:
                    result = bulk.handler(chunk)
                    if not is_write:
                        if type(result) is not bytes or len(result) != count * size:
                            result = _bulk_data(result, count * size)
                        scatter(plan, result)
                except Exception as exc:
                    out.append(self._finish_string(plan, [Step(bulk, chunk, 0)], [], Status.HANDLER_FAILED, exc))
                    return None
                if deadline is not None and self._clock() - started > deadline:
                    out.append(self._finish_string(plan, [Step(bulk, chunk, 0)], [], Status.DEADLINE_EXCEEDED, None))
                    return None
                out.append(plan.completion())
                return None
            template = [new(Step, (bulk, chunk, 0))]
        elif claim is not None and claim.last >= port + size - 1 and size <= claim.max_size:
            element = new(PortAccess, (port, size, is_write, 0, port - claim.first, vp, partition))
            template = [new(Step, (claim, element, 0))]
            is_async = claim.is_async
        else:
            template = self._split(port, size, is_write, 0, vp, partition)
            is_async = any(step.claim is not None and step.claim.is_async for step in template)
        if is_async:
            self._waiting[key] = deque()
            steps = template if bulk is not None else _element_steps(template, count, data, size)
            return Job(key, steps, partition, vp, port, plan.access_info, is_write, plan.rax, plan.rip, plan)
        results: list[object] = []
        status, error = Status.COMPLETED, None
        started = self._clock() if deadline is not None else 0.0
        try:
            _run_elements(template, count, data, size, results)
        except Exception as exc:
            status, error = Status.HANDLER_FAILED, exc
        if status is Status.COMPLETED and deadline is not None and self._clock() - started > deadline:
            status = Status.DEADLINE_EXCEEDED
        out.append(self._finish_string(plan, template, results, status, error))
        return None

    def _finish_string(
        self, plan: StringPlan, template: list[Step], results: list[object], status: Status, error: BaseException | None
    ) -> bytes:
        # A handler that fails leaves the elements before it as they came; the
        # rest read all ones (or are dropped), as do all after a deadline, whose
        # results are discarded. Either way the chunk completes.
        stats = self.stats
        size, count = plan.size, plan.elements
        if not isinstance(template[0].claim, BulkClaim):
            unclaimed = count * sum(step.claim is None for step in template)
            if plan.is_write:
                stats.unclaimed_writes += unclaimed
            else:
                stats.unclaimed_reads += unclaimed
        if not plan.is_write:
            data = b""
            if status is not Status.DEADLINE_EXCEEDED:
                try:
                    data = _read_data(template, results, size, count, status)
                except (TypeError, ValueError) as exc:
                    status, error = Status.HANDLER_FAILED, exc
            missing = count * size - len(data)
            try:
                scatter(plan, data + b"\xff" * missing if missing else data)
            except GuestMemoryError as vanished:
                # The VMM took the memory away while async handlers ran (only
                # a job can straddle that): the guest sees nothing happen.
                stats.memory_errors += 1
                log.warning(
                    "string access to port %#x by partition %d, VP %d: %s",
                    plan.port,
                    plan.partition,
                    plan.vp_index,
                    vanished,
                )
                return plan._replace(registers=0).completion(Status.MEMORY_ERROR, MemoryFault.UNMAPPED)
        if status is not Status.COMPLETED:
            self._note_failure(
                plan.partition, plan.vp_index, plan.port, plan.access_info, plan.is_write, status, error, template
            )
        return plan.completion(status)

    def _reject(self, frame: bytes, out: list[bytes]) -> None:
        """Answer a malformed frame with a PROTOCOL_ERROR completion naming the bad offset."""
        self.stats.protocol_errors += 1
        error = first_error(frame)
        offset, reason = (error.offset, str(error)) if error is not None else (0, "malformed frame")
        partition = int.from_bytes(frame[8:16], "little") if len(frame) >= 16 else 0
        vp = int.from_bytes(frame[16:20], "little") if len(frame) >= 20 else UNKNOWN_VP
        log.warning("rejected a frame from partition %d, VP %#x: %s", partition, vp, reason)
        out.append(
            _pack(
                COMPLETION,
                _PAYLOAD,
                0,
                0,
                0,
                partition,
                vp,
                PROTOCOL_VERSION,
                Status.PROTOCOL_ERROR,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                offset,
            )
        )


def first_error(frame: bytes) -> FrameError | None:
    """The first check an intercept frame fails, or None if it is well formed."""
    try:
        check_header(frame, int.from_bytes(frame[:4], "little") if len(frame) >= 4 else 0, _KNOWN)
        check_io_payload(frame[21], frame[58], frame[59])
    except FrameError as error:
        return error
    return None


def _element_steps(template: list[Step], count: int, data: bytes, size: int) -> list[Step]:
    # One element's steps repeated for each element; an OUTS element's value
    # goes to its steps (shifted where the access was split into bytes).
    if not template[0].access.is_write:
        return template * count
    return [
        Step(
            step.claim,
            cast(PortAccess, step.access)._replace(value=value >> step.shift & _MASK[step.access.size]),
            step.shift,
        )
        for value in unpack_elements(data, size)
        for step in template
    ]


def _bulk_data(result: object, length: int) -> bytes:
    # What a bulk read handler returned, checked to be the bytes of the chunk.
    if type(result) is bytes:
        data = result
    elif isinstance(result, (bytearray, memoryview)):
        data = bytes(result)
    else:
        raise TypeError(f"a bulk read handler returned {type(result).__name__}, not bytes")
    if len(data) != length:
        raise ValueError(f"a bulk read handler returned {len(data)} bytes, not {length}")
    return data


def _run_elements(template: list[Step], count: int, data: bytes, size: int, results: list[object]) -> None:
    # Call the synchronous handlers of a string chunk's elements, appending
    # each result as it returns: if one raises, ``results`` holds the calls
    # before it.
    append = results.append
    first = template[0]
    claim = cast("Claim | None", first.claim)
    if len(template) > 1:
        for step in _element_steps(template, count, data, size):
            append(call_step(step))
    elif claim is None:
        results.extend([None] * count)
    elif first.access.is_write:
        handler, new, port_access = claim.handler, tuple.__new__, PortAccess
        port, _, _, _, offset, vp, partition = cast(PortAccess, first.access)
        for value in unpack_elements(data, size):
            append(handler(new(port_access, (port, size, True, value, offset, vp, partition))))
    else:
        handler, access = claim.handler, cast(PortAccess, first.access)
        for _ in range(count):
            append(handler(access))


def _read_data(template: list[Step], results: list[object], size: int, count: int, status: Status) -> bytes:
    # The bytes an INS chunk read, for the elements whose calls all returned.
    first = template[0]
    if isinstance(first.claim, BulkClaim):
        return _bulk_data(results[0], count * size) if status is Status.COMPLETED else b""
    if len(template) == 1:
        return b"" if first.claim is None else pack_elements(results, size)
    values: list[object] = []
    for start in range(0, len(results) - len(template) + 1, len(template)):
        value = 0
        for step, result in zip(template, results[start : start + len(template)], strict=True):
            mask = _MASK[step.access.size]
            if step.claim is None:
                value |= mask << step.shift
            elif isinstance(result, int):
                value |= (result & mask) << step.shift
            else:
                raise TypeError(f"a read handler returned {result!r}, not an int")
        values.append(value)
    return pack_elements(values, size)
