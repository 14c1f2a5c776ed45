"""Intercept latency samples: what a byte mover records into, and percentiles over them.

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

__all__ = ["LatencySamples"]


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
