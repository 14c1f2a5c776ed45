"""The service's statistics line: counts, errors, latency percentiles and the busiest ports."""

from __future__ import annotations

from dispatcher import EngineStats

from ..latency import LatencySamples

__all__ = ["format_stats"]


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
