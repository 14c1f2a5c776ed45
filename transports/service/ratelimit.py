"""Repeated log lines summarized: a :class:`logging.Filter` that lets a few of a kind through per interval.

A handler that fails on every intercept, or a VMM that sends nothing but
bad frames, would otherwise write a line (and a traceback) per intercept.
The filter lets the first ``burst`` records of each kind through in an
``interval``, counts the rest, and once the interval is over emits one
summary: "LAST MESSAGE: N more like this in the last 10 s".

What makes two records "the same kind" is the ``key`` function's answer; by
default the logger, the level and the message template (before its
arguments are filled in). Records below ``level`` are never held back by kind.
A summary is emitted when the next record of its kind arrives after the
interval, or by :meth:`RateLimit.flush`, which the owner calls now and then
and at exit; ``clock`` is injectable so tests need not sleep.

Over all kinds and every level, the process writes at most ``max_rate``
lines per second (``serve --log-rate``, default :data:`DEFAULT_LOG_RATE`):
a client that makes each failure a kind of its own (a new partition per
frame) or a flood of INFO lines cannot fill the disk. The lines over the
cap are counted and one summary says how many were dropped. Kinds tracked
at once are bounded too (``max_kinds``): past that, a record of a new kind
is only subject to the global cap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = ["DEFAULT_LOG_RATE", "DEFAULT_MAX_KINDS", "RateLimit", "check_log_rate", "template_key"]

DEFAULT_LOG_RATE = 100
"""Log lines per second the whole process writes at most, unless told otherwise (``--log-rate``)."""
DEFAULT_MAX_KINDS = 4096
"""Kinds of record the per-kind limit tracks at once."""
_GLOBAL_INTERVAL = 1.0


def check_log_rate(text: str) -> int:
    """Parse a ``--log-rate`` value: lines per second, 0 for no cap. Raises ``ValueError`` naming the value."""
    try:
        rate = int(text)
    except ValueError:
        raise ValueError(f"--log-rate {text!r}: not a whole number of lines per second") from None
    if rate < 0:
        raise ValueError(f"--log-rate {rate}: out of range (0 for no cap, or lines per second)")
    return rate


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
    ``rate_summary`` and pass their kind's limit, not the cap. ``max_rate``
    caps the lines per second over every kind and level (0: no cap); the
    line that counts what the cap dropped (attribute ``rate_dropped``) is
    never held back.
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
        max_rate: int = DEFAULT_LOG_RATE,
        max_kinds: int = DEFAULT_MAX_KINDS,
    ) -> None:
        super().__init__()
        if burst < 1 or not interval > 0:
            raise ValueError(f"burst must be at least 1 and interval above 0, not {burst} and {interval}")
        if max_rate < 0 or max_kinds < 1:
            raise ValueError(f"max_rate must be at least 0 and max_kinds at least 1, not {max_rate} and {max_kinds}")
        self.emit = emit
        self.burst = burst
        self.interval = interval
        self.level = level
        self.key = key
        self.clock = clock
        self.max_rate = max_rate
        self.max_kinds = max_kinds
        self._windows: dict[Hashable, _Window] = {}
        self._global: _Window | None = None
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "rate_dropped", False):
            return True
        summaries = []
        with self._lock:
            now = self.clock()
            passed = True
            # A kind's summary passes its kind's limit but counts against the
            # cap: thousands of kinds must not write thousands of summaries.
            if record.levelno >= self.level and not getattr(record, "rate_summary", False):
                passed, summary = self._per_kind(record, now)
                if summary is not None:
                    summaries.append(summary)
            if passed and self.max_rate:
                passed, summary = self._under_cap(record, now)
                if summary is not None:
                    summaries.append(summary)
        for summary in summaries:
            self.emit(summary)
        return passed

    def _per_kind(self, record: logging.LogRecord, now: float) -> tuple[bool, logging.LogRecord | None]:
        kind = self.key(record)
        summary = None
        window = self._windows.get(kind)
        if window is not None and now - window.start >= self.interval:
            summary = self._summary(window)
            del self._windows[kind]
            window = None
        if window is None:
            if len(self._windows) < self.max_kinds:
                self._windows[kind] = _Window(now, 1)
            return True, summary
        if window.passed < self.burst:
            window.passed += 1
            return True, summary
        window.suppressed += 1
        window.last = record
        return False, summary

    def _under_cap(self, record: logging.LogRecord, now: float) -> tuple[bool, logging.LogRecord | None]:
        summary = None
        window = self._global
        if window is not None and now - window.start >= _GLOBAL_INTERVAL:
            summary = self._dropped(window)
            window = None
        if window is None:
            self._global = _Window(now, 1)
            return True, summary
        if window.passed < self.max_rate:
            window.passed += 1
            return True, summary
        window.suppressed += 1
        window.last = record
        return False, summary

    def flush(self, *, everything: bool = False) -> int:
        """Emit the summaries of the intervals that are over (of all, with ``everything``); return how many."""
        with self._lock:
            now = self.clock()
            ended = [k for k, w in self._windows.items() if everything or now - w.start >= self.interval]
            summaries = [s for s in (self._summary(self._windows.pop(k)) for k in ended) if s is not None]
            window = self._global
            if window is not None and (everything or now - window.start >= _GLOBAL_INTERVAL):
                self._global = None
                dropped = self._dropped(window)
                if dropped is not None:
                    summaries.append(dropped)
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

    def _dropped(self, window: _Window) -> logging.LogRecord | None:
        if not window.suppressed:
            return None
        summary = logging.LogRecord(
            "intercept_dispatch.log",
            logging.WARNING,
            __file__,
            0,
            "%d log lines dropped in the last %g s: more than %d lines per second (--log-rate)",
            (window.suppressed, _GLOBAL_INTERVAL, self.max_rate),
            None,
        )
        summary.rate_summary = summary.rate_dropped = True
        return summary
