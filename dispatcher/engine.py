"""The dispatch decisions, sans-I/O: intercept frames in, completion frames out.

The :class:`Engine` takes each frame, keeps the per-VP order and hands the
access to its port I/O decisions (:mod:`dispatcher.port_io`) or its string
I/O execution (:mod:`dispatcher.string_exec`). Synchronous handlers run
inline and their completions come back at once. Work that must be awaited
(an async handler) comes back as a :class:`~dispatcher.port_io.Job` for the
I/O layer to run; the layer reports the outcome with :meth:`Engine.finish`.
While a VP has a job outstanding, its later intercepts wait in a queue.
Nothing here imports anyio or touches a socket.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from .errors import FrameError
from .guest import Guest
from .port_io import KEEP, MASK, RIP_ONLY, RIP_RAX, Intercepted, Job, PortIo, Step, call_step
from .router import PortAccess, Router
from .stats import EngineStats
from .string_exec import StringIo
from .string_plan import DEFAULT_MAX_ELEMENTS
from .wire import (
    INTERCEPT_LEAN,
    INTERCEPT_SIZE,
    IO_PORT_INTERCEPT,
    IO_PORT_PAYLOAD_SIZE,
    PROTOCOL_VERSION,
    SLOT_SIZE,
    VALID_ACCESS_INFO,
    Offset,
    Status,
    check_intercept,
    frame_ids,
    pack_completion,
    pack_completion_body,
)
from .x86 import IP_MASK_BY_MODE, next_ip

__all__ = ["Engine", "EngineObserver"]

log = logging.getLogger("intercept_dispatch.engine")

# Indexed by AccessType << 8 | AccessInfo: what the inline path takes, a
# read or write whose AccessInfo is valid and not a string operation.
_SIMPLE_ACCESS = tuple(key >> 8 <= 1 and VALID_ACCESS_INFO[key & 0xFF] and not key & 0x08 for key in range(0x10000))
# The hot path's functions (see Engine.receive) as module globals, which read as fast as locals do and
# need no copying into locals per call: most calls carry one frame.
_unpack_lean = INTERCEPT_LEAN.unpack_from
_pack_body = pack_completion_body
_new_tuple = tuple.__new__  # skips a NamedTuple's Python-level __new__, a third of its cost


class EngineObserver(Protocol):
    """Sees every frame an :class:`Engine` takes and every completion it makes, in the order they happen.

    Calls come under the VM's device lock (where the engine is called),
    each intercept before its handlers run; a recorder
    (:class:`dispatcher.recorder.Recorder`) is one.
    """

    def intercept(self, frame: bytes) -> None: ...

    def completion(self, frame: bytes) -> None: ...


class Engine:
    """Sans-I/O dispatch over one connection's stream of intercept frames.

    ``deadline`` (seconds, or None) bounds a handler: a synchronous handler
    cannot be interrupted, so one that returns after the deadline has its
    result discarded (in a ``watched`` :meth:`receive` the caller's
    watchdog does that); an async one is cancelled by the I/O layer. Either
    way the VP gets a DEADLINE_EXCEEDED completion.

    ``guest`` is where string I/O reads and writes (without it a string
    access gets UNSUPPORTED); ``max_elements`` bounds the elements one
    intercept moves.

    ``inline`` (default True) answers the common access (well formed, not a
    string operation, wholly inside one synchronous claim, its VP idle) on a
    fast path inside :meth:`receive`. It gives exactly what the general path
    gives; ``inline=False`` is the test hook that proves it.

    ``partition`` (None: any) is the one partition this connection serves (a
    VM's): a frame of another gets a PROTOCOL_ERROR completion whose detail
    is ``Offset.PARTITION`` and reaches no device.

    ``observer`` (an :class:`EngineObserver`) sees each frame before it is
    handled and each completion as it is made; frames then take the
    general path, one at a time.

    ``on_failure(status, error)`` hears of each access that failed
    (HANDLER_FAILED with the exception, DEADLINE_EXCEEDED with None) in
    place of the log line the engine would write: a replay keeps them as its
    results.
    """

    def __init__(
        self,
        router: Router,
        *,
        deadline: float | None = 5.0,
        clock: Callable[[], float] = time.perf_counter,
        stats: EngineStats | None = None,
        guest: Guest | None = None,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        inline: bool = True,
        partition: int | None = None,
        observer: EngineObserver | None = None,
        on_failure: Callable[[Status, BaseException | None], object] | None = None,
    ) -> None:
        if max_elements < 1:
            raise ValueError(f"max_elements must be at least 1, not {max_elements}")
        self.router = router
        self.deadline = deadline
        self.stats = stats if stats is not None else EngineStats()
        self.guest = guest
        self.max_elements = max_elements
        self.inline = inline
        self.partition = partition
        self.observer = observer
        self._general = not inline or observer is not None
        self._clock = clock
        self._port_io = PortIo(router, self.stats, on_failure)
        self._string_io = StringIo(
            router, self.stats, self._port_io, guest=guest, max_elements=max_elements, deadline=deadline, clock=clock
        )
        # For watched calls (see receive): the same string I/O, its handlers not timed.
        self._string_io_watched = StringIo(
            router, self.stats, self._port_io, guest=guest, max_elements=max_elements, deadline=None, clock=clock
        )
        self._waiting: dict[int, deque[bytes]] = {}
        # The hot path's locals (see receive): the router's tables and the
        # statistics' counts, changed in place, never replaced. No bound
        # method in it: the engine would then hold itself in a cycle.
        self._locals = (router.read_table, router.write_table, self.stats.port_counts, self._waiting, clock)
        self.queued = 0
        """Frames waiting behind a VP's outstanding job, over all VPs."""

    @property
    def busy(self) -> bool:
        """True while some VP has a job outstanding."""
        return bool(self._waiting)

    def receive(
        self, frames: Iterable[bytes], out: list[bytes] | None = None, watched: bool = False
    ) -> tuple[list[bytes], list[Job]]:
        """Take a batch of frames; return completions ready now and jobs to run.

        Completions are appended to ``out`` (a new list if None) as each is
        made, so that a watchdog can see those of a batch whose handler hung.
        ``watched`` says that such a watchdog answers, at the deadline, any
        synchronous handler of this call that passes it (and the caller
        drops whatever this call makes after that): the handlers are then
        not timed here, so a late one is counted once, by the watchdog.
        """
        if out is None:
            out = []
        jobs: list[Job] = []
        deadline = None if watched else self.deadline
        timed = deadline is not None
        if self._general:
            observer = self.observer
            for frame in frames:
                if observer is None:
                    job = self._process(frame, out, timed=timed)
                else:
                    observer.intercept(frame)
                    made = len(out)
                    job = self._process(frame, out, timed=timed)
                    for completion in out[made:]:
                        observer.completion(completion)
                if job is not None:
                    jobs.append(job)
            return out, jobs
        append = out.append
        read_table, write_table, counts, waiting, clock = self._locals
        only, limit = self.partition, deadline or 0.0
        # Timed, each handler's run is the time between two clock reads: one after it, one before it
        # (or after the previous one, whose bookkeeping since is a few microseconds).
        last = clock() if timed else 0.0
        for frame in frames:
            # The one inline path: a well-formed, non-string access wholly
            # inside one synchronous claim, for a VP with nothing queued. At
            # the first irregularity the frame goes to the general path.
            try:
                (mtype, b4, _, _, _, partition, vp, length_cr8, access_type, state, cs_attributes, rip, _, port,
                 access_info, byte_count, _, rax) = _unpack_lean(frame)  # fmt: skip
            except struct.error:
                self._process(frame, out, False, timed)
                continue
            size = access_info & 7
            claim = (write_table if access_type else read_table)[port]
            if (
                claim is None
                or claim.is_async
                or claim.last < port + size - 1
                or size > claim.max_size
                or b4 != IO_PORT_PAYLOAD_SIZE
                or mtype != IO_PORT_INTERCEPT
                or not INTERCEPT_SIZE <= len(frame) <= SLOT_SIZE
                or not _SIMPLE_ACCESS[access_type << 8 | access_info]
                or byte_count > 16
                or (waiting and (partition << 32 | vp) in waiting)
                or (only is not None and partition != only)
            ):
                job = self._process(frame, out, False, timed)
                if job is not None:
                    jobs.append(job)
                if timed:
                    last = clock()
                continue
            counts[port] += 1
            # x86.mode_index, inline: the bits that choose the code size.
            next_rip = (rip + (length_cr8 & 0xF)) & IP_MASK_BY_MODE[state & 0x10 | cs_attributes >> 13 & 3]
            is_write = access_type == 1
            access = _new_tuple(
                PortAccess,
                (port, size, is_write, rax & MASK[size] if is_write else 0, port - claim.first, vp, partition),
            )
            try:
                result = claim.handler(access)
            except Exception as error:
                intercepted = Intercepted(partition, vp, port, access_info, is_write, rax, next_rip)
                append(self._port_io.fail(intercepted, Status.HANDLER_FAILED, error, [Step(claim, access, 0)]))
                if timed:
                    last = clock()
                continue
            if timed:
                now = clock()
                elapsed, last = now - last, now
                if elapsed > limit:
                    intercepted = Intercepted(partition, vp, port, access_info, is_write, rax, next_rip)
                    append(self._port_io.fail(intercepted, Status.DEADLINE_EXCEEDED, None, [Step(claim, access, 0)]))
                    continue
            if is_write:
                named = RIP_ONLY
            elif type(result) is int:
                named, rax = RIP_RAX, (rax & KEEP[size]) | (result & MASK[size])
            else:
                intercepted = Intercepted(partition, vp, port, access_info, is_write, rax, next_rip)
                append(self._port_io.complete(intercepted, [Step(claim, access, 0)], [result]))
                continue
            append(_pack_body(partition, vp, PROTOCOL_VERSION, 0, named, next_rip, rax, 0, 0, 0, port, access_info,
                              0, 0))  # fmt: skip
        return out, jobs

    def answer_port(
        self, partition: int, vp: int, port: int, access_info: int, is_write: bool, rax: int, next_rip: int
    ) -> int | bytes | None:
        """Answer an intercept a transport has decoded itself, when it is the common case; None when not.

        For a transport that reads the exit's fields without building a
        frame (a vCPU thread): the same answer :meth:`receive` gives the
        frame with these fields. None: nothing ran (the access is not a
        well-formed non-string access wholly inside one synchronous claim,
        its VP has work queued, it is another partition's, or an observer
        wants frames): send the frame instead. An int: the usual completion
        (RIP to ``next_rip``; for an IN, this value, masked to the access
        size, merged into RAX as the architecture does; 0 for an OUT).
        Bytes: any other completion, as a frame (a handler raised or
        returned something other than an int). The handler is not timed: the
        caller's watchdog holds it to the deadline, as in a ``watched``
        :meth:`receive`.
        """
        size = access_info & 7
        claim = (self.router.write_table if is_write else self.router.read_table)[port]
        if (
            claim is None
            or claim.is_async
            or claim.last < port + size - 1
            or size > claim.max_size
            or self._general
            or not _SIMPLE_ACCESS[is_write << 8 | access_info]
            or (self._waiting and (partition << 32 | vp) in self._waiting)
            or (self.partition is not None and partition != self.partition)
        ):
            return None
        self.stats.port_counts[port] += 1
        access = _new_tuple(
            PortAccess, (port, size, is_write, rax & MASK[size] if is_write else 0, port - claim.first, vp, partition)
        )
        try:
            result = claim.handler(access)
        except Exception as error:
            intercepted = Intercepted(partition, vp, port, access_info, is_write, rax, next_rip)
            return self._port_io.fail(intercepted, Status.HANDLER_FAILED, error, [Step(claim, access, 0)])
        if is_write:
            return 0
        if type(result) is int:
            return result & MASK[size]
        intercepted = Intercepted(partition, vp, port, access_info, is_write, rax, next_rip)
        return self._port_io.complete(intercepted, [Step(claim, access, 0)], [result])

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
        if job.intercepted is None:
            out.append(self._string_io.finish(job, results or [], status, error))
        elif status is Status.COMPLETED and results is not None:
            out.append(self._port_io.complete(job.intercepted, job.steps, results))
        else:
            out.append(self._port_io.fail(job.intercepted, status, error, job.steps))
        queue = self._waiting[job.key]
        more: list[Job] = []
        while queue:
            self.queued -= 1
            next_job = self._process(queue.popleft(), out, queued=True)
            if next_job is not None:
                more.append(next_job)
                break
        else:
            del self._waiting[job.key]
        if self.observer is not None:
            for completion in out:
                self.observer.completion(completion)
        return out, more

    def abandoned(self, frame: bytes) -> bytes:
        """The DEADLINE_EXCEEDED completion of ``frame``, whose synchronous handler never returned.

        Made without waiting for that handler (another thread may be stuck
        in it): a port access completes as a dead device's would (a read
        gets all ones), a string access is not performed. The observer sees
        it as the frame's completion.
        """
        completion = self._abandoned(frame)
        if self.observer is not None:
            self.observer.completion(completion)
        return completion

    def _abandoned(self, frame: bytes) -> bytes:
        try:
            check_intercept(frame)
        except FrameError as error:
            partition, vp = frame_ids(frame)
            return pack_completion(partition, vp, Status.PROTOCOL_ERROR, 0, 0, 0, detail=error.offset)
        (_, _, _, _, _, partition, vp, length_cr8, access_type, state, cs_attributes, rip, _, port, access_info, _, _,
         rax) = INTERCEPT_LEAN.unpack_from(frame)  # fmt: skip
        is_write = access_type == 1
        if access_info & 0x08:
            self.stats.deadline_exceeded += 1
            return pack_completion(partition, vp, Status.DEADLINE_EXCEEDED, 0, rip, rax, port=port,
                                   access_info=access_info)  # fmt: skip
        next_rip = next_ip(rip, length_cr8 & 0xF, state, cs_attributes)
        size = access_info & 7
        steps = self._port_io.steps(port, size, is_write, rax, vp, partition)
        intercepted = Intercepted(partition, vp, port, access_info, is_write, rax, next_rip)
        return self._port_io.fail(intercepted, Status.DEADLINE_EXCEEDED, None, steps)

    def _process(self, frame: bytes, out: list[bytes], queued: bool = False, timed: bool = True) -> Job | None:
        # The general path: every check, per-VP order, string I/O, splits and async handlers. Not ``timed``:
        # synchronous handlers are not held to the deadline here (a watched call, see receive).
        only = self.partition
        if only is not None and not queued:
            partition = frame_ids(frame)[0]
            if partition != only:
                self._refuse_partition(frame, partition, only, out)
                return None
        try:
            check_intercept(frame)
        except FrameError as error:
            self._reject(frame, error, out)
            return None
        (_, _, _, _, _, partition, vp, length_cr8, access_type, state, cs_attributes, rip, _, port, access_info, _, _,
         rax) = INTERCEPT_LEAN.unpack_from(frame)  # fmt: skip
        key = partition << 32 | vp
        if not queued:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.append(frame)
                self.queued += 1
                return None
        job: Job | None
        if access_info & 0x08:
            job = (self._string_io if timed else self._string_io_watched).start(frame, out, key)
        else:
            job = self._port(partition, vp, length_cr8, access_type, state, cs_attributes, rip, port, access_info, rax,
                             key, out, timed)  # fmt: skip
        if job is not None:
            self._waiting.setdefault(key, deque())  # a queued frame keeps the VP's queue behind it
        return job

    def _port(self, partition: int, vp: int, length_cr8: int, access_type: int, state: int, cs_attributes: int,
              rip: int, port: int, access_info: int, rax: int, key: int, out: list[bytes],
              timed: bool) -> Job | None:  # fmt: skip
        # One IN or OUT: run its synchronous steps now, or make a job of them.
        self.stats.port_counts[port] += 1
        next_rip = next_ip(rip, length_cr8 & 0xF, state, cs_attributes)
        size = access_info & 7
        is_write = access_type == 1
        port_io = self._port_io
        steps = port_io.steps(port, size, is_write, rax, vp, partition)
        intercepted = Intercepted(partition, vp, port, access_info, is_write, rax, next_rip)
        if any(step.claim is not None and step.claim.is_async for step in steps):
            return Job(key, steps, intercepted)
        results: list[object] = []
        deadline = self.deadline if timed else None
        started = self._clock() if deadline is not None else 0.0
        try:
            for step in steps:
                results.append(call_step(step))
        except Exception as error:
            out.append(port_io.fail(intercepted, Status.HANDLER_FAILED, error, steps))
            return None
        if deadline is not None and self._clock() - started > deadline:
            out.append(port_io.fail(intercepted, Status.DEADLINE_EXCEEDED, None, steps))
            return None
        out.append(port_io.complete(intercepted, steps, results))
        return None

    def _refuse_partition(self, frame: bytes, partition: int, only: int, out: list[bytes]) -> None:
        # A frame of another VM on this VM's connection: refused before any device sees it.
        self.stats.protocol_errors += 1
        vp = frame_ids(frame)[1]
        log.warning("frame for partition %d on VM %d's connection (VP %#x): refused", partition, only, vp)
        out.append(pack_completion(partition, vp, Status.PROTOCOL_ERROR, 0, 0, 0, 0, 0, 0, 0, 0, Offset.PARTITION))

    def _reject(self, frame: bytes, error: FrameError, out: list[bytes]) -> None:
        # A malformed frame: a PROTOCOL_ERROR completion naming the bad offset.
        self.stats.protocol_errors += 1
        partition, vp = frame_ids(frame)
        log.warning("rejected a frame from partition %d, VP %#x: %s", partition, vp, error)
        out.append(pack_completion(partition, vp, Status.PROTOCOL_ERROR, 0, 0, 0, 0, 0, 0, 0, 0, error.offset))
