"""The command line: ``intercept-dispatch`` (``python -m examples``) and the service's own ``serve`` entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from service_process import ServiceProcess

from examples.cli import main as command
from transports.service.server import main as serve_main


def poke(socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "examples", "poke", "--socket", str(socket_path), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_serve_without_devices_serves_the_example_pc(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path, socket=tmp_path / "pc.sock")
    try:
        assert poke(tmp_path / "pc.sock", "outb", "0x64", "0xAA").returncode == 0  # the i8042 self-test
        assert poke(tmp_path / "pc.sock", "inb", "0x60").stdout == "0x55\n"
        assert poke(tmp_path / "pc.sock", "outl", "0xCF8", "0x80000000").returncode == 0
        assert poke(tmp_path / "pc.sock", "inl", "0xCFC").stdout == "0x12378086\n"  # the i440FX host bridge
    finally:
        assert service.stop() == 0, service.log


def test_the_service_alone_has_no_default_devices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main(["--socket", str(tmp_path / "s.sock")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no devices to serve" in error and "--device" in error
    assert not (tmp_path / "s.sock").exists()


def test_help_describes_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_status:
        command(["--help"])
    assert exit_status.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: intercept-dispatch")
    assert all(name in text for name in ("demo", "serve", "poke"))


def test_an_unknown_option_of_demo_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_status:
        command(["demo", "--fast"])
    assert exit_status.value.code == 2
    assert "unrecognized arguments: --fast" in capsys.readouterr().err
