"""Per-device and per-VM counts and handler latency, kept by wrapping each claim's handler.

:func:`instrument` copies a router with every handler wrapped: the wrapper
counts the call (and whether it raised) under the calling VM, and times a
sample of the calls into a latency histogram. A VM is a partition: the
service knows a VM only by the SourcePartition of the intercepts it sends.

The cost on the hot path is one extra Python call and one dictionary
update per handler call (about 0.1 us). Timing every call would add two
clock reads; instead a synchronous handler is timed on its first call from
each VM and on every 64th after that. An async handler (already off the
inline path, and most often the slow one worth watching) is timed on every
call; its time includes whatever it awaits.
"""

from __future__ import annotations

import bisect
import functools
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from dispatcher import Access, BulkClaim, Claim, Router

__all__ = [
    "LATENCY_BOUNDS",
    "SAMPLE_EVERY",
    "HandlerMetrics",
    "Histogram",
    "display_name",
    "instrument",
    "ports_text",
]

LATENCY_BOUNDS: Final = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Upper bounds (seconds) of the latency histograms' buckets; a last bucket takes everything longer."""
SAMPLE_EVERY: Final = 64
"""A synchronous handler is timed on calls 1, 65, 129, ... from each VM."""
_SAMPLE_MASK = SAMPLE_EVERY - 1


class Histogram:
    """Sampled handler times: a count per bucket of :data:`LATENCY_BOUNDS` (and one past them), and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.total += seconds

    @property
    def samples(self) -> int:
        return sum(self.counts)

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total

    def percentile(self, point: float) -> float | None:
        """The upper bound of the bucket holding the ``point`` percentile (0-100); inf past the last bound."""
        samples = self.samples
        if not samples:
            return None
        wanted = max(1, point / 100 * samples)
        seen = 0
        for bound, count in zip((*LATENCY_BOUNDS, float("inf")), self.counts, strict=True):
            seen += count
            if seen >= wanted:
                return bound
        return float("inf")

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "sum_seconds": self.total, "counts": list(self.counts)}


class HandlerMetrics:
    """What one claim's wrapper counted, by VM (partition id): calls, calls that raised, sampled latency."""

    __slots__ = ("calls", "claim", "failures", "latency", "name", "ports")

    def __init__(self, claim: Claim | BulkClaim) -> None:
        self.claim = claim
        self.name = display_name(claim.handler)
        self.ports = ports_text(claim)
        self.calls: defaultdict[int, int] = defaultdict(int)
        self.failures: defaultdict[int, int] = defaultdict(int)
        self.latency: dict[int, Histogram] = {}

    @property
    def bulk(self) -> bool:
        return isinstance(self.claim, BulkClaim)

    def record(self, vm: int, seconds: float) -> None:
        histogram = self.latency.get(vm)
        if histogram is None:
            histogram = self.latency[vm] = Histogram()
        histogram.add(seconds)

    def vms(self) -> set[int]:
        return set(self.calls)


def display_name(handler: object) -> str:
    """A handler's name for people: its qualified name without ``<locals>`` parts."""
    name = getattr(handler, "__qualname__", None) or type(handler).__qualname__
    return ".".join(part for part in str(name).split(".") if part != "<locals>")


def ports_text(claim: Claim | BulkClaim) -> str:
    """``0x3f8-0x3ff rw``: a claim's ports and directions (a bulk claim's with "bulk")."""
    span = f"{claim.first:#x}" if claim.first == claim.last else f"{claim.first:#x}-{claim.last:#x}"
    access = ("r" if claim.access & Access.READ else "") + ("w" if claim.access & Access.WRITE else "")
    return f"{span} {access}{' bulk' if isinstance(claim, BulkClaim) else ''}"


def instrument(router: Router) -> tuple[Router, list[HandlerMetrics]]:
    """A copy of ``router`` whose handlers count and time themselves; the metrics, one per claim.

    The copy has the same claims (ports, directions, ``max_size``, bulk
    handlers) and the same claim names in logs. Claims added to ``router``
    later are not in it.
    """
    copy = Router()
    metrics: list[HandlerMetrics] = []
    for claim in router.claims:
        entry = HandlerMetrics(claim)
        wrapped = _wrap(claim.handler, entry, is_async=claim.is_async)
        copy.add(cast(Any, wrapped), claim.first, claim.last - claim.first + 1, access=claim.access,
                 max_size=claim.max_size)  # fmt: skip
        metrics.append(entry)
    for bulk in router.bulk_claims:
        entry = HandlerMetrics(bulk)
        wrapped = _wrap(bulk.handler, entry, is_async=bulk.is_async)
        copy.add_bulk(cast(Any, wrapped), bulk.first, bulk.last - bulk.first + 1, access=bulk.access)
        metrics.append(entry)
    return copy, metrics


def _wrap(handler: Callable[[Any], Any], entry: HandlerMetrics, *, is_async: bool) -> Callable[[Any], Any]:
    calls, failures, record = entry.calls, entry.failures, entry.record
    clock = time.perf_counter

    def counted(access: Any) -> Any:
        # PortAccess and BulkAccess both name the partition: the VM.
        vm = access.partition
        n = calls[vm] = calls[vm] + 1
        if n & _SAMPLE_MASK != 1:
            try:
                return handler(access)
            except Exception:
                failures[vm] += 1
                raise
        started = clock()
        try:
            return handler(access)
        except Exception:
            failures[vm] += 1
            raise
        finally:
            record(vm, clock() - started)

    async def counted_async(access: Any) -> Any:
        vm = access.partition
        calls[vm] += 1
        started = clock()
        try:
            return await cast(Awaitable[Any], handler(access))
        except Exception:
            failures[vm] += 1
            raise
        finally:
            record(vm, clock() - started)

    wrapper = counted_async if is_async else counted
    # The claim keeps the handler's name (Claim.name, in logs and errors); __wrapped__ leads to the device.
    functools.update_wrapper(wrapper, handler, assigned=("__module__", "__name__", "__qualname__", "__doc__"),
                             updated=())  # fmt: skip
    return wrapper
