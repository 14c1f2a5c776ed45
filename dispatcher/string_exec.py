"""String I/O execution, sans-I/O: run a planned INS/OUTS chunk through the port's handlers.

:mod:`dispatcher.string_plan` decides which guest bytes an intercept moves;
this module calls the port's bulk handler once for the chunk, or its
handler once per element, and moves the bytes with ``gather``/``scatter``.
Async handlers make a :class:`~dispatcher.port_io.Job` that the I/O layer
awaits; :meth:`StringIo.finish` then completes the chunk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import cast

from .errors import AccessRefused, GuestMemoryError
from .guest import Guest
from .guest_memory import MemoryFault
from .port_io import MASK, Job, PortIo, Step, call_step
from .router import BulkAccess, BulkClaim, Claim, PortAccess, Router
from .stats import EngineStats
from .string_plan import StringPlan, gather, pack_elements, plan_string, refusal_completion, scatter, unpack_elements
from .wire import ECHO, Offset, Registers, Status, frame_ids

__all__ = ["StringIo"]

log = logging.getLogger("intercept_dispatch.engine")


class StringIo:
    """The string I/O of one engine: its guest, its chunk bound and its deadline."""

    __slots__ = ("clock", "deadline", "guest", "max_elements", "port_io", "router", "stats")

    def __init__(
        self,
        router: Router,
        stats: EngineStats,
        port_io: PortIo,
        *,
        guest: Guest | None,
        max_elements: int,
        deadline: float | None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.router = router
        self.stats = stats
        self.port_io = port_io
        self.guest = guest
        self.max_elements = max_elements
        self.deadline = deadline
        self.clock = clock

    def finish(self, job: Job, results: list[object], status: Status, error: BaseException | None) -> bytes:
        """The completion of a string job whose handlers returned ``results`` (or failed with ``status``)."""
        plan = job.string
        assert plan is not None
        steps = job.steps  # one element's steps repeated, or one bulk step
        template = steps if isinstance(steps[0].claim, BulkClaim) else steps[: len(steps) // plan.elements]
        return self._complete(plan, template, results, status, error)

    def start(self, frame: bytes, out: list[bytes], key: int) -> Job | None:
        """Run one string intercept: its completion goes to ``out``, or it becomes a Job to await."""
        stats = self.stats
        try:
            plan = plan_string(frame, self.guest, self.max_elements)
        except AccessRefused as refused:
            partition, vp = frame_ids(frame)
            port = ECHO.unpack_from(frame, Offset.RIP)[1]
            status = Status(refused.status)
            if status is Status.PROTOCOL_ERROR:
                stats.protocol_errors += 1
            else:
                stats.port_counts[port] += 1
                if status is Status.UNSUPPORTED:
                    stats.unsupported += 1
                else:
                    stats.memory_errors += 1
            log.warning(
                "string access to port %#x by partition %d, VP %d: %s: %s", port, partition, vp, status.name, refused
            )
            out.append(refusal_completion(frame, refused))
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
                started = self.clock() if deadline is not None else 0.0
                try:
                    result = bulk.handler(chunk)
                    if not is_write:
                        if type(result) is not bytes or len(result) != count * size:
                            result = _bulk_data(result, count * size)
                        scatter(plan, result)
                except Exception as exc:
                    out.append(self._complete(plan, [Step(bulk, chunk, 0)], [], Status.HANDLER_FAILED, exc))
                    return None
                if deadline is not None and self.clock() - started > deadline:
                    out.append(self._complete(plan, [Step(bulk, chunk, 0)], [], Status.DEADLINE_EXCEEDED, None))
                    return None
                out.append(plan.completion())
                return None
            template = [new(Step, (bulk, chunk, 0))]
        elif claim is not None and claim.last >= port + size - 1 and size <= claim.max_size:
            element = new(PortAccess, (port, size, is_write, 0, port - claim.first, vp, partition))
            template = [new(Step, (claim, element, 0))]
            is_async = claim.is_async
        else:
            template = self.port_io.split(port, size, is_write, 0, vp, partition)
            is_async = any(step.claim is not None and step.claim.is_async for step in template)
        if is_async:
            steps = template if bulk is not None else _element_steps(template, count, data, size)
            return Job(key, steps, None, plan)
        results: list[object] = []
        status, error = Status.COMPLETED, None
        started = self.clock() if deadline is not None else 0.0
        try:
            _run_elements(template, count, data, size, results)
        except Exception as exc:
            status, error = Status.HANDLER_FAILED, exc
        if status is Status.COMPLETED and deadline is not None and self.clock() - started > deadline:
            status = Status.DEADLINE_EXCEEDED
        out.append(self._complete(plan, template, results, status, error))
        return None

    def _complete(
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
                return plan._replace(registers=Registers.NONE).completion(Status.MEMORY_ERROR, MemoryFault.UNMAPPED)
        if status is not Status.COMPLETED:
            self.port_io.note_failure(
                plan.partition, plan.vp_index, plan.port, plan.access_info, plan.is_write, status, error, template
            )
        return plan.completion(status)


def _element_steps(template: list[Step], count: int, data: bytes, size: int) -> list[Step]:
    # One element's steps repeated for each element; an OUTS element's value
    # goes to its steps (shifted where the access was split into bytes).
    if not template[0].access.is_write:
        return template * count
    return [
        Step(
            step.claim,
            cast(PortAccess, step.access)._replace(value=value >> step.shift & MASK[step.access.size]),
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
            mask = MASK[step.access.size]
            if step.claim is None:
                value |= mask << step.shift
            elif isinstance(result, int):
                value |= (result & mask) << step.shift
            else:
                raise TypeError(f"a read handler returned {result!r}, not an int")
        values.append(value)
    return pack_elements(values, size)
