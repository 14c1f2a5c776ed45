"""``intercept-dispatch trace dump FILE [--limit N]``: the text, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher import AccessInfo, AccessType, IoPortInterceptMessage
from dispatcher.trace import TraceWriter, new_metadata
from dispatcher.trace_records import ClockAdvance, Intercept
from transports.testbench.trace_command import main


def trace_file(path: Path) -> Path:
    frame = IoPortInterceptMessage(
        port_number=0x80, access_type=AccessType.WRITE, access_info=AccessInfo.build(1), rax=0x12, rip=0xF000
    ).to_bytes()
    with TraceWriter(path, new_metadata("api")) as writer:
        writer.write(Intercept(1_500, 1, frame))
        writer.write(ClockAdvance(2_000_000, 2))
    return path


def test_dump_prints_metadata_then_one_line_per_event(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dump", str(trace_file(tmp_path / "t.trace"))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert '# source: "api"' in lines
    events = [" ".join(line.split()) for line in lines if not line.startswith("#")]
    assert events == [
        "0 1.500us INTERCEPT vp=0 OUT port=0x0080 size=1 value=0x12 rip=0xf000",
        "1 2000.000us CLOCK",
    ]


def test_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dump", str(trace_file(tmp_path / "t.trace")), "--limit", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "# ... 1 more events"
    assert sum(1 for line in lines if not line.startswith("#")) == 1


def test_a_bad_file_is_one_line_and_status_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.trace"
    bad.write_bytes(b"not a trace at all, no")
    assert main(["dump", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"intercept-dispatch trace: error: {bad}, offset 0: magic")


@pytest.mark.parametrize("argv", [[], ["dump"], ["dump", "x", "--limit", "-1"], ["undo", "x"]])
def test_usage_errors_are_one_line_and_status_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
