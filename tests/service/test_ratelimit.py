"""The log rate limit: a few records of a kind per interval, then one summary line; on an injected clock."""

from __future__ import annotations

import logging

import pytest

from transports.service.ratelimit import RateLimit
from transports.service.server import failure_kind


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(message: str, *args: object, level: int = logging.ERROR, name: str = "intercept_dispatch.engine") -> (
    logging.LogRecord
):  # fmt: skip
    return logging.LogRecord(name, level, __file__, 1, message, args, None)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def summaries() -> list[logging.LogRecord]:
    return []


@pytest.fixture
def limit(clock: Clock, summaries: list[logging.LogRecord]) -> RateLimit:
    return RateLimit(summaries.append, burst=3, interval=10.0, clock=clock)


def test_the_first_few_of_a_kind_pass_and_the_rest_are_held_back(limit: RateLimit) -> None:
    passed = [limit.filter(record("handler failed on port %#x", 0x81)) for _ in range(10)]
    assert passed == [True] * 3 + [False] * 7


def test_a_summary_follows_once_the_interval_is_over(
    limit: RateLimit, clock: Clock, summaries: list[logging.LogRecord]
) -> None:
    for vp in range(10):
        limit.filter(record("handler failed on port %#x, VP %d", 0x81, vp))
    assert limit.flush() == 0  # the interval is not over yet
    clock.now += 9.9
    assert limit.flush() == 0
    clock.now += 0.1
    assert limit.flush() == 1
    [summary] = summaries
    assert summary.getMessage() == "handler failed on port 0x81, VP 9: 7 more like this in the last 10 s"
    assert (summary.levelno, summary.name) == (logging.ERROR, "intercept_dispatch.engine")
    assert limit.filter(summary)  # a summary passes the filter that made it


def test_the_next_record_after_the_interval_brings_the_summary_and_passes(
    limit: RateLimit, clock: Clock, summaries: list[logging.LogRecord]
) -> None:
    for _ in range(5):
        limit.filter(record("rejected a frame"))
    clock.now += 10
    assert limit.filter(record("rejected a frame"))
    assert [s.getMessage() for s in summaries] == ["rejected a frame: 2 more like this in the last 10 s"]
    # A new interval began with that record: two more pass, then they are held back again.
    assert [limit.filter(record("rejected a frame")) for _ in range(3)] == [True, True, False]


def test_no_summary_when_nothing_was_held_back(
    limit: RateLimit, clock: Clock, summaries: list[logging.LogRecord]
) -> None:
    for _ in range(3):
        limit.filter(record("rejected a frame"))
    clock.now += 60
    assert limit.flush() == 0 and summaries == []


def test_kinds_are_counted_apart(limit: RateLimit) -> None:
    for _ in range(3):
        assert limit.filter(record("one kind"))
        assert limit.filter(record("another kind"))
        assert limit.filter(record("one kind", name="intercept_dispatch.transports"))
    assert not limit.filter(record("one kind"))


def test_records_below_the_level_are_never_held_back(limit: RateLimit) -> None:
    # COM1's output is logged line by line at INFO: every line must reach the log.
    assert all(limit.filter(record("COM1: %s", "hello", level=logging.INFO)) for _ in range(100))


def test_flush_everything_at_exit_summarizes_unfinished_intervals(
    limit: RateLimit, summaries: list[logging.LogRecord]
) -> None:
    for _ in range(4):
        limit.filter(record("accepting a connection failed: %s", "Too many open files"))
    assert limit.flush(everything=True) == 1
    assert summaries[0].getMessage().endswith(": 1 more like this in the last 10 s")


def test_a_summary_is_one_line_without_the_traceback(
    limit: RateLimit, clock: Clock, summaries: list[logging.LogRecord]
) -> None:
    try:
        raise RuntimeError("broken on purpose")
    except RuntimeError as error:
        failing = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed\nmore detail", None, (RuntimeError, error,
                                    error.__traceback__))  # fmt: skip
    for _ in range(4):
        limit.filter(failing)
    clock.now += 10
    limit.flush()
    [summary] = summaries
    assert summary.exc_info is None and "\n" not in summary.getMessage()


def test_burst_and_interval_are_checked() -> None:
    with pytest.raises(ValueError, match="burst"):
        RateLimit(print, burst=0)
    with pytest.raises(ValueError, match="interval"):
        RateLimit(print, interval=0)


def test_the_service_tells_failures_apart_by_port_and_handler_not_by_vp() -> None:
    template = "%s on port %#x (%s, %d bytes) by %s, partition %d, VP %d"
    one = record(template, "handler failed", 0x81, "read", 1, "broken", 0, 1)
    same_port_other_vp = record(template, "handler failed", 0x81, "write", 1, "broken", 0, 7)
    other_port = record(template, "handler failed", 0x82, "read", 1, "broken", 0, 1)
    assert failure_kind(one) == failure_kind(same_port_other_vp)
    assert failure_kind(one) != failure_kind(other_port)
    rejected = "rejected a frame from partition %d, VP %#x: %s"
    assert failure_kind(record(rejected, 1, 2, "bad size")) == failure_kind(record(rejected, 1, 5, "bad type"))
    assert failure_kind(record(rejected, 1, 2, "bad size")) != failure_kind(record(rejected, 2, 2, "bad size"))
    # Any other message: one kind per template.
    assert failure_kind(record("x %d", 1)) == failure_kind(record("x %d", 2))
