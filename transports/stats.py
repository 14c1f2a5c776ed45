"""Service statistics: intercept latency samples and the one-line report.

Latency is sampled, not measured for every intercept: a stream transport
(:attr:`FdStreamTransport.latency <transports.fdstream.FdStreamTransport.latency>`)
takes one sample per batch it reads, from the moment the batch is read to
the moment the completion of its first frame is written. Under light load
every intercept is a batch of its own, so every one is measured; under
heavy load the samples describe the batches the service actually handles,
at the cost of two dictionary operations per batch instead of per frame.
"""

from __future__ import annotations

from collections import deque

from dispatcher import EngineStats

__all__ = ["LatencySamples", "format_stats"]


class LatencySamples:
    """The most recent latency samples (seconds), with percentiles over them."""

    __slots__ = ("samples",)

    def __init__(self, keep: int = 10_000) -> None:
        self.samples: deque[float] = deque(maxlen=keep)

    def percentiles(self, *points: float) -> list[float]:
        """The given percentiles (0-100) of the kept samples; empty if there are none."""
        ordered = sorted(self.samples)
        if not ordered:
            return []
        last = len(ordered) - 1
        return [ordered[min(last, round(p / 100 * last))] for p in points]


def format_stats(stats: EngineStats, latency: LatencySamples, *, extra: str = "", top: int = 8) -> str:
    """One line for the log: counts, errors, unclaimed accesses, latency percentiles, busiest ports."""
    errors = stats.protocol_errors + stats.handler_failed + stats.deadline_exceeded
    parts = [
        f"{stats.intercepts} intercepts, {stats.completed} completed",
        f"{errors} errors ({stats.protocol_errors} protocol, {stats.handler_failed} handler, "
        f"{stats.deadline_exceeded} deadline), {stats.unsupported} unsupported",
        f"unclaimed {stats.unclaimed_reads} reads, {stats.unclaimed_writes} writes",
    ]
    if extra:
        parts.append(extra)
    points = latency.percentiles(50, 90, 99)
    if points:
        p50, p90, p99 = (f"{p * 1e6:.0f}" for p in points)
        parts.append(f"latency p50 {p50} us, p90 {p90} us, p99 {p99} us ({len(latency.samples)} samples)")
    busiest = stats.per_port.most_common(top)
    if busiest:
        parts.append("ports " + " ".join(f"{port:#x}:{count}" for port, count in busiest))
    return "; ".join(parts)
