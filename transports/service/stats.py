"""The service's statistics line: counts, errors, latency percentiles and the busiest ports."""

from __future__ import annotations

from typing import Any

from dispatcher import EngineStats

from ..latency import LatencySamples

__all__ = ["format_document", "format_stats"]


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


def format_document(document: dict[str, Any], *, extra: str = "", top: int = 8) -> str:
    """The same line from a statistics document (``report.merge_stats``): what a supervisor of workers logs."""
    counts = document["intercepts"]
    errors = counts["protocol_errors"] + counts["handler_failed"] + counts["deadline_exceeded"]
    parts = [
        f"{counts['received']} intercepts, {counts['completed']} completed",
        f"{errors} errors ({counts['protocol_errors']} protocol, {counts['handler_failed']} handler, "
        f"{counts['deadline_exceeded']} deadline), {counts['unsupported']} unsupported",
        f"unclaimed {counts['unclaimed_reads']} reads, {counts['unclaimed_writes']} writes",
    ]
    if extra:
        parts.append(extra)
    trip = document["round_trip"]
    if "p50_seconds" in trip:
        p50, p90, p99 = (f"{trip[f'p{p}_seconds'] * 1e6:.0f}" for p in (50, 90, 99))
        parts.append(f"latency p50 {p50} us, p90 {p90} us, p99 {p99} us ({trip['samples']} samples)")
    busiest = sorted(document["ports"].items(), key=lambda item: -item[1])[:top]
    if busiest:
        parts.append("ports " + " ".join(f"{port}:{count}" for port, count in busiest))
    return "; ".join(parts)
