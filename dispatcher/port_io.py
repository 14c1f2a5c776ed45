"""Port I/O decisions, sans-I/O: which handler calls an access makes, and the completion they add up to.

An access wholly inside one claim is one :class:`Step`; one that straddles
claims, reaches unclaimed ports or is wider than the claim's ``max_size``
is split into byte steps, combined little-endian. :class:`PortIo` turns the
steps' results into the completion frame, or a failed access into the
completion a dead device gives (reads all ones, writes dropped), counting
and logging it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, cast

from .router import BulkAccess, BulkClaim, Claim, PortAccess, Router
from .stats import EngineStats
from .string_plan import StringPlan
from .wire import Registers, Status, pack_completion

__all__ = ["KEEP", "MASK", "Intercepted", "Job", "PortIo", "Step", "call_step"]

log = logging.getLogger("intercept_dispatch.engine")

MASK = (0, 0xFF, 0xFFFF, 0, 0xFFFF_FFFF)
"""By access size: the bits an access of that size moves."""
KEEP = (0, ~0xFF & (1 << 64) - 1, ~0xFFFF & (1 << 64) - 1, 0, 0)
"""By access size: the bits of RAX an IN of that size keeps (a 32-bit IN zero-extends)."""
RIP_ONLY = int(Registers.RIP)
RIP_RAX = int(Registers.RIP | Registers.RAX)


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


class Intercepted(NamedTuple):
    """What a port I/O completion echoes or derives from its intercept."""

    partition: int
    vp_index: int
    port: int
    access_info: int
    is_write: bool
    rax: int
    next_rip: int


@dataclass(slots=True, eq=False)
class Job:
    """An intercept whose handlers must be awaited. ``steps`` run in order.

    For string I/O, ``string`` is the chunk's plan (and ``intercepted`` None).
    """

    key: int
    steps: list[Step]
    intercepted: Intercepted | None
    string: StringPlan | None = None


class PortIo:
    """The port I/O decisions of one engine: steps of an access, and their completion."""

    __slots__ = ("on_failure", "router", "stats")

    def __init__(
        self,
        router: Router,
        stats: EngineStats,
        on_failure: Callable[[Status, BaseException | None], object] | None = None,
    ) -> None:
        self.router = router
        self.stats = stats
        self.on_failure = on_failure

    def steps(self, port: int, size: int, is_write: bool, rax: int, vp: int, partition: int) -> list[Step]:
        """The handler calls of one IN or OUT."""
        claim = (self.router.write_table if is_write else self.router.read_table)[port]
        value = rax & MASK[size] if is_write else 0
        if claim is not None and claim.last >= port + size - 1 and size <= claim.max_size:
            return [Step(claim, PortAccess(port, size, is_write, value, port - claim.first, vp, partition), 0)]
        return self.split(port, size, is_write, rax, vp, partition)

    def split(self, port: int, size: int, is_write: bool, rax: int, vp: int, partition: int) -> list[Step]:
        """Byte steps for an access that one claim cannot take whole; one unclaimed step if nobody claims it."""
        table = self.router.write_table if is_write else self.router.read_table
        claims = [table[port + i] for i in range(size)]
        if all(c is None for c in claims):
            return [Step(None, PortAccess(port, size, is_write, rax & MASK[size], 0, vp, partition), 0)]
        return [
            Step(
                c,
                PortAccess(port + i, 1, is_write, rax >> 8 * i & 0xFF, port + i - c.first if c else 0, vp, partition),
                8 * i,
            )
            for i, c in enumerate(claims)
        ]

    def complete(self, intercepted: Intercepted, steps: list[Step], results: list[object]) -> bytes:
        """The completion of an access whose steps returned ``results``."""
        stats = self.stats
        partition, vp, port, access_info, is_write, rax, next_rip = intercepted
        if is_write:
            stats.unclaimed_writes += sum(step.claim is None for step in steps)
            return pack_completion(partition, vp, Status.COMPLETED, RIP_ONLY, next_rip, rax, 0, 0, 0, port, access_info)
        value = 0
        for step, result in zip(steps, results, strict=True):
            mask = MASK[step.access.size]
            if step.claim is None:
                stats.unclaimed_reads += 1
                value |= mask << step.shift
            elif isinstance(result, int):
                value |= (result & mask) << step.shift
            else:
                error = TypeError(f"a read handler returned {result!r}, not an int")
                return self.fail(intercepted, Status.HANDLER_FAILED, error, steps)
        rax = (rax & KEEP[access_info & 7]) | value
        return pack_completion(partition, vp, Status.COMPLETED, RIP_RAX, next_rip, rax, 0, 0, 0, port, access_info)

    def fail(self, intercepted: Intercepted, status: Status, error: BaseException | None, steps: list[Step]) -> bytes:
        """The completion of an access whose handler failed or ran past its deadline."""
        # The instruction still completes, as on hardware with a dead device:
        # a read gets all ones, a write is dropped.
        partition, vp, port, access_info, is_write, rax, next_rip = intercepted
        self.note_failure(partition, vp, port, access_info, is_write, status, error, steps)
        if is_write:
            return pack_completion(partition, vp, status, RIP_ONLY, next_rip, rax, 0, 0, 0, port, access_info)
        size = access_info & 7
        rax = (rax & KEEP[size]) | MASK[size]
        return pack_completion(partition, vp, status, RIP_RAX, next_rip, rax, 0, 0, 0, port, access_info)

    def note_failure(
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
        """Count a failed access and log it, or hand it to ``on_failure`` where one was given."""
        stats = self.stats
        if status is Status.DEADLINE_EXCEEDED:
            stats.deadline_exceeded += 1
        else:
            stats.handler_failed += 1
        if self.on_failure is not None:
            self.on_failure(status, error)
            return
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
