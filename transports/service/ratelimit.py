"""Repeated log lines summarized: a :class:`logging.Filter` that lets a few of a kind through per interval.

A handler that fails on every intercept, or a VMM that sends nothing but
bad frames, would otherwise write a line (and a traceback) per intercept.
The filter lets the first ``burst`` records of each kind through in an
``interval``, counts the rest, and once the interval is over emits one
summary: "LAST MESSAGE: N more like this in the last 10 s".

What makes two records "the same kind" is the ``key`` function's answer; by
default the logger, the level and the message template (before its
arguments are filled in). Records below ``level`` are never held back.
A summary is emitted when the next record of its kind arrives after the
interval, or by :meth:`RateLimit.flush`, which the owner calls now and then
and at exit; ``clock`` is injectable so tests need not sleep.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = ["RateLimit", "template_key"]


def template_key(record: logging.LogRecord) -> Hashable:
    """The default kind of a record: its logger, level and message template."""
    return record.name, record.levelno, str(record.msg)


@dataclass(slots=True)
class _Window:
    start: float
    passed: int
    suppressed: int = 0
    last: logging.LogRecord | None = None


class RateLimit(logging.Filter):
    """At most ``burst`` records of one kind per ``interval`` seconds; a summary line for the rest.

    ``emit`` receives the summary records (attach the filter to a handler
    and pass that handler's ``handle``); they carry the attribute
    ``rate_summary`` and pass this filter unchanged.
    """

    def __init__(
        self,
        emit: Callable[[logging.LogRecord], object],
        *,
        burst: int = 3,
        interval: float = 10.0,
        level: int = logging.WARNING,
        key: Callable[[logging.LogRecord], Hashable] = template_key,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if burst < 1 or not interval > 0:
            raise ValueError(f"burst must be at least 1 and interval above 0, not {burst} and {interval}")
        self.emit = emit
        self.burst = burst
        self.interval = interval
        self.level = level
        self.key = key
        self.clock = clock
        self._windows: dict[Hashable, _Window] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level or getattr(record, "rate_summary", False):
            return True
        kind = self.key(record)
        summary = None
        with self._lock:
            now = self.clock()
            window = self._windows.get(kind)
            if window is not None and now - window.start >= self.interval:
                summary = self._summary(window)
                window = None
            if window is None:
                self._windows[kind] = _Window(now, 1)
                passed = True
            elif window.passed < self.burst:
                window.passed += 1
                passed = True
            else:
                window.suppressed += 1
                window.last = record
                passed = False
        if summary is not None:
            self.emit(summary)
        return passed

    def flush(self, *, everything: bool = False) -> int:
        """Emit the summaries of the intervals that are over (of all, with ``everything``); return how many."""
        with self._lock:
            now = self.clock()
            ended = [k for k, w in self._windows.items() if everything or now - w.start >= self.interval]
            summaries = [s for s in (self._summary(self._windows.pop(k)) for k in ended) if s is not None]
        for summary in summaries:
            self.emit(summary)
        return len(summaries)

    def _summary(self, window: _Window) -> logging.LogRecord | None:
        last = window.last
        if last is None:
            return None
        message = last.getMessage().partition("\n")[0]
        summary = logging.LogRecord(
            last.name,
            last.levelno,
            last.pathname,
            last.lineno,
            "%s: %d more like this in the last %g s",
            (message, window.suppressed, self.interval),
            None,
            last.funcName,
        )
        summary.rate_summary = True
        return summary
