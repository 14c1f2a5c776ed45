"""The log rate limit: a few records of a kind per interval, then one summary line, and a cap on all lines per
second; on an injected clock."""

from __future__ import annotations

import io
import logging

import pytest

from transports.service.ratelimit import DEFAULT_LOG_RATE, RateLimit, check_log_rate
from transports.service.server import LOG_FORMAT, failure_kind


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
    # No global cap here: these tests are about the limit per kind (the cap has its own below).
    return RateLimit(summaries.append, burst=3, interval=10.0, clock=clock, max_rate=0)


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


# The cap over every kind and level.


@pytest.fixture
def capped(clock: Clock, summaries: list[logging.LogRecord]) -> RateLimit:
    return RateLimit(summaries.append, burst=3, interval=10.0, clock=clock, max_rate=100)


def test_the_cap_holds_back_lines_of_many_kinds(
    capped: RateLimit, clock: Clock, summaries: list[logging.LogRecord]
) -> None:
    # Each record a kind of its own, as a client sending frames of a new partition each time makes them.
    passed = [capped.filter(record("rejected a frame %d", n, name=f"kind{n}")) for n in range(150)]
    assert passed == [True] * 100 + [False] * 50
    assert capped.flush() == 0  # the second is not over yet
    clock.now += 1
    assert capped.flush() == 1
    [summary] = summaries
    assert summary.getMessage() == "50 log lines dropped in the last 1 s: more than 100 lines per second (--log-rate)"
    assert summary.levelno == logging.WARNING and capped.filter(summary)


def test_the_cap_counts_every_level(capped: RateLimit) -> None:
    # Below the level nothing is held back by kind, but the cap still counts the lines.
    passed = [capped.filter(record("COM1: %s", "hello", level=logging.INFO)) for _ in range(101)]
    assert passed == [True] * 100 + [False]


def test_the_next_line_after_the_second_brings_the_count_and_passes(
    capped: RateLimit, clock: Clock, summaries: list[logging.LogRecord]
) -> None:
    for n in range(105):
        capped.filter(record("line %d", n, level=logging.INFO))
    clock.now += 1.5
    assert capped.filter(record("line", level=logging.INFO))
    assert [s.getMessage().split(":")[0] for s in summaries] == ["5 log lines dropped in the last 1 s"]
    assert all(capped.filter(record("line", level=logging.INFO)) for _ in range(99))  # a new second: 100 in all
    assert not capped.filter(record("line", level=logging.INFO))


def test_summaries_of_kinds_count_against_the_cap(clock: Clock) -> None:
    # Three kinds' summaries, made by a limit without a cap, reach a handler filtered by one with a cap of 2.
    made: list[logging.LogRecord] = []
    maker = RateLimit(made.append, burst=1, interval=10.0, clock=clock, max_rate=0)
    for n in range(3):
        maker.filter(record("failed %d", n, name=f"kind{n}"))
        maker.filter(record("failed %d", n, name=f"kind{n}"))
    clock.now += 10
    assert maker.flush() == 3
    counted: list[logging.LogRecord] = []
    capped = RateLimit(counted.append, clock=clock, max_rate=2)
    assert [capped.filter(summary) for summary in made] == [True, True, False]
    # The line counting what the cap dropped is never held back itself.
    clock.now += 1
    assert capped.flush() == 1
    [dropped] = counted
    assert dropped.getMessage().startswith("1 log lines dropped") and capped.filter(dropped)


def test_no_cap_when_the_rate_is_zero(clock: Clock) -> None:
    limit = RateLimit(print, clock=clock, max_rate=0)
    assert all(limit.filter(record("line %d", n, level=logging.INFO)) for n in range(10_000))


def test_kinds_past_the_bound_are_not_tracked_but_still_capped(clock: Clock) -> None:
    limit = RateLimit(print, burst=1, clock=clock, max_rate=10, max_kinds=2)
    assert limit.filter(record("a")) and limit.filter(record("b"))
    assert not limit.filter(record("a"))  # tracked: its burst of one is spent
    # A third kind finds no room: not limited by kind, only by the cap.
    # The two lines that passed count against the cap of 10; the one held back by its kind does not.
    assert [limit.filter(record("c")) for _ in range(9)] == [True] * 8 + [False]


def test_the_whole_log_of_a_flood_of_rejected_frames_stays_small(clock: Clock) -> None:
    # 4 MiB of 16-byte junk frames, each from a partition of its own, through the service's real
    # handler set-up: the log holds the cap's 100 lines and one count, not 262,144 lines.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    limit = RateLimit(handler.handle, key=failure_kind, clock=clock)
    handler.addFilter(limit)
    logger = logging.getLogger("test_ratelimit.flood")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for partition in range((4 << 20) // 16):
            logger.error("rejected a frame from partition %d, VP %#x: %s", partition, 0, "bad size")
        clock.now += 1
        limit.flush()
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == DEFAULT_LOG_RATE + 1
    assert lines[-1].endswith(f"{(4 << 20) // 16 - 100} log lines dropped in the last 1 s: more than 100 lines "
                              "per second (--log-rate)")  # fmt: skip
    assert len(stream.getvalue()) < 20_000


@pytest.mark.parametrize(("text", "rate"), [("0", 0), ("100", 100), ("5000", 5000)])
def test_log_rate_values(text: str, rate: int) -> None:
    assert check_log_rate(text) == rate


@pytest.mark.parametrize(("text", "message"), [("-1", "out of range"), ("fast", "not a whole number")])
def test_bad_log_rate_values_are_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"--log-rate .*{message}"):
        check_log_rate(text)


def test_max_rate_and_max_kinds_are_checked() -> None:
    with pytest.raises(ValueError, match="max_rate"):
        RateLimit(print, max_rate=-1)
    with pytest.raises(ValueError, match="max_kinds"):
        RateLimit(print, max_kinds=0)
