"""The replay and minimize commands: exit statuses, the last line, one-line errors."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import pytest
from buggy_devices import sequenced
from recording import port_frame, record

from dispatcher.trace import TraceWriter, new_metadata, read_trace
from examples.cli import main

HERE = Path(__file__).parent
ARMED = [port_frame(0x510, write=True, value=0x5A), port_frame(0x511, write=True, value=0xA5)]


def write_trace(
    path: Path, frames: list[bytes], machine: str | None = "buggy_devices:sequenced", **args: object
) -> Path:
    events = record(sequenced(fixed=True), frames)
    with TraceWriter(path, new_metadata("test", machine=machine, machine_args=args)) as writer:
        writer.write_all(events)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    status = main([argv[0], "--device-path", str(HERE), *argv[1:]])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err


def test_a_matching_replay_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "ok.trace", [*ARMED, port_frame(0x512)], fixed=True)
    status, out, err = run(capsys, "replay", str(trace))
    assert (status, out, err) == (0, ["replayed 3 intercepts, 0 differ"], "")


def test_a_differing_replay_exits_1_and_shows_the_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "bug.trace", [*ARMED, port_frame(0x512), port_frame(0x512)], machine=None)
    status, out, _ = run(capsys, "replay", str(trace), "--device", "buggy_devices:sequenced")
    assert status == 1
    assert out[0].startswith("event 5 at ") and "completion of IN 0x512 (1 byte) differs (status, rax)" in out[0]
    assert "  raised:   ZeroDivisionError: the planted bug" in out
    assert "... and 1 more differences" in out
    assert out[-1] == "replayed 4 intercepts, 2 differ"


def test_an_allow_file_accepts_differences(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "bug.trace", [*ARMED, port_frame(0x512)], machine=None)
    allow = tmp_path / "allow.toml"
    allow.write_text('[[allow]]\nports = "0x512"\nreason = "known crash"\n')
    status, out, _ = run(capsys, "replay", str(trace), "--device", "buggy_devices:sequenced", "--allow", str(allow))
    assert status == 0
    assert "allowed: 1 differences" in out and any("known crash" in line for line in out)
    assert out[-1] == "replayed 3 intercepts, 0 differ"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p.write_bytes(b"IDTRACE\x00\x07\x00"), "intercept-dispatch replay: error: "),
        (lambda p: write_trace(p, ARMED, machine=None), "the trace names no machine to replay against"),
        (lambda p: write_trace(p, ARMED, machine="no_such_module:x"), "cannot import 'no_such_module'"),
        (lambda p: p.write_text("not a log at all\n"), "intercept-dispatch replay: error: "),
        (lambda p: None, "No such file or directory"),
    ],
)
def test_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: Callable[[Path], object], message: str
) -> None:
    path = tmp_path / "input.trace"
    setup(path)
    status, out, err = run(capsys, "replay", str(path))
    assert status == 1 and out == []
    assert err.count("\n") == 1 and err.startswith("intercept-dispatch replay: error: ") and message in err


def test_a_bad_allow_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "ok.trace", ARMED, fixed=True)
    allow = tmp_path / "allow.toml"
    allow.write_text('[[allow]]\nports = "0x512"\n')
    status, _, err = run(capsys, "replay", str(trace), "--allow", str(allow))
    assert status == 1 and err == f"intercept-dispatch replay: error: {allow}: allow entry 1: reason: missing " \
        "(every entry needs ports and a reason)\n"  # fmt: skip


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["replay"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_qemu_log_is_told_by_its_content(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "qemu.log.gz"
    lines = [
        "1@1.000000:memory_region_ops_write cpu 0 mr 0x1 addr 0x513 value 0x2a size 1 name 'scratch'",
        "1@1.000010:memory_region_ops_read cpu 0 mr 0x1 addr 0x513 value 0x2a size 1 name 'scratch'",
    ]
    log.write_bytes(gzip.compress("\n".join(lines).encode() + b"\n"))
    status, out, _ = run(capsys, "replay", str(log), "--device", "buggy_devices:sequenced")
    assert (status, out) == (0, ["replayed 2 intercepts, 0 differ"])


def test_minimize_writes_the_small_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    noise = [port_frame(0x513, write=True, value=v) for v in range(20)]
    trace = write_trace(tmp_path / "bug.trace", [*noise[:10], *ARMED, *noise[10:], port_frame(0x512)])
    out_path = tmp_path / "small.trace"
    status, out, err = run(capsys, "minimize", str(trace), "-o", str(out_path), "--timeout", "30")
    assert (status, err) == (0, "")
    assert out == ["failure: a handler raised ZeroDivisionError at port 0x512", "minimized 23 intercepts to 3"]
    small = read_trace(out_path)
    assert small.intercepts == 3 and small.metadata["machine"] == "buggy_devices:sequenced"


def test_minimize_refuses_a_trace_that_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "ok.trace", ARMED)
    status, _, err = run(capsys, "minimize", str(trace), "-o", str(tmp_path / "out.trace"))
    assert status == 1
    assert (
        err == "intercept-dispatch minimize: error: the trace replays without a failure: there is nothing to minimize\n"
    )
