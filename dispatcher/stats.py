"""What a dispatcher counts: intercepts per port and every kind of failure."""

from __future__ import annotations

from collections import Counter

from .router import PORT_LIMIT

__all__ = ["EngineStats"]


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
