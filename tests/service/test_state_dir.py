"""``serve --state-dir``: every VM's device state saved when the service stops on SIGTERM, restored when the VM
next connects to a new service; a bad state file refuses that VM's HELLO naming the problem. Real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from service_process import ServiceProcess

from transports.service.poke import COMPLETED, REFUSED

pytest.importorskip("dispatcher.device_state", reason="the device state API is not built yet")

PROG = "intercept-dispatch poke"


def poke(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "examples", "poke", "--socket", str(socket), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def serve(tmp: Path, state: Path, *more: str) -> ServiceProcess:
    return ServiceProcess(tmp, "--state-dir", str(state), "--deadline", "30", *more, socket=tmp / "s.sock")


def write_cmos(socket: Path, vm: int, index: int, value: int) -> None:
    assert poke(socket, "--vm", str(vm), "outb", "0x70", hex(index)).returncode == COMPLETED
    assert poke(socket, "--vm", str(vm), "outb", "0x71", hex(value)).returncode == COMPLETED


def read_cmos(socket: Path, vm: int, index: int) -> str:
    assert poke(socket, "--vm", str(vm), "outb", "0x70", hex(index)).returncode == COMPLETED
    read = poke(socket, "--vm", str(vm), "inb", "0x71")
    assert read.returncode == COMPLETED, read.stderr
    return read.stdout.strip()


@pytest.mark.parametrize("mode", [(), ("--in-process",)], ids=["worker per VM", "in process"])
def test_a_restart_with_the_same_state_dir_loses_nothing(tmp_path: Path, mode: tuple[str, ...]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    first = serve(tmp_path, state, *mode)
    try:
        write_cmos(first.socket, 7, 0x34, 0xAB)  # type: ignore[arg-type]
        write_cmos(first.socket, 8, 0x34, 0xCD)  # type: ignore[arg-type]
    finally:
        assert first.stop() == 0, first.log
    saved = state / "vm-7.json"
    document = json.loads(saved.read_text())  # a person can read it
    assert document["format"] == "intercept-dispatch device state"
    assert (state / "vm-8.json").exists()
    second = serve(tmp_path, state, *mode)
    try:
        assert read_cmos(second.socket, 7, 0x34) == "0xab"  # type: ignore[arg-type]
        assert read_cmos(second.socket, 8, 0x34) == "0xcd"  # type: ignore[arg-type]
        assert not saved.exists()  # restored: a crash later does not bring this old state back
        assert "restored from" in second.log
    finally:
        assert second.stop() == 0, second.log
    assert json.loads(saved.read_text())["devices"]  # saved again at the second stop


def test_release_forgets_the_vm_and_its_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    service = serve(tmp_path, state)
    try:
        write_cmos(service.socket, 9, 0x34, 0x42)  # type: ignore[arg-type]
        assert poke(service.socket, "--vm", "9", "release").returncode == COMPLETED  # type: ignore[arg-type]
        assert read_cmos(service.socket, 9, 0x34) != "0x42"  # type: ignore[arg-type]
        assert poke(service.socket, "--vm", "9", "release").returncode == COMPLETED  # type: ignore[arg-type]
    finally:
        assert service.stop() == 0, service.log
    assert not (state / "vm-9.json").exists()


def _bad_file(good: dict[str, object], how: str) -> str:
    devices = good["devices"]
    assert isinstance(devices, dict)
    rtc = next(ident for ident, entry in devices.items() if entry["kind"].startswith("mc146818"))
    if how == "another device":
        other = next(entry for entry in devices.values() if entry["kind"] != devices[rtc]["kind"])
        devices[rtc] = other
    elif how == "newer version":
        devices[rtc]["version"] = int(devices[rtc]["version"]) + 1
    text = json.dumps(good, indent=1)
    if how == "truncated":
        return text[: len(text) // 2]
    if how == "corrupted":
        return text.replace(":", ";", 5)
    return text


@pytest.mark.parametrize("how", ["another device", "newer version", "truncated", "corrupted"])
def test_a_bad_state_file_refuses_that_vm_naming_the_problem_and_keeps_the_file(tmp_path: Path, how: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    service = serve(tmp_path, state)
    try:
        write_cmos(service.socket, 3, 0x34, 0x11)  # type: ignore[arg-type]
        saved = poke(service.socket, "--vm", "3", "save", str(tmp_path / "good.json"))  # type: ignore[arg-type]
        assert saved.returncode == COMPLETED, saved.stderr
    finally:
        assert service.stop() == 0
    good = json.loads((tmp_path / "good.json").read_text())
    bad = state / "vm-4.json"
    bad.write_text(_bad_file(good, how))
    service = serve(tmp_path, state)
    try:
        refused = poke(service.socket, "--vm", "4", "inb", "0x71")  # type: ignore[arg-type]
        assert refused.returncode == REFUSED
        line = refused.stderr.rstrip("\n")
        assert "\n" not in line and "Traceback" not in refused.stderr
        assert f"state file {bad}" in line
        if how in ("another device", "newer version"):
            assert "mc146818" in line  # the device
        assert bad.exists()  # kept for the operator
        assert "move the file away to start it from reset" in service.log  # once, saying what to do
        assert read_cmos(service.socket, 3, 0x34) == "0x11"  # type: ignore[arg-type]  # other VMs go on
    finally:
        assert service.stop() == 0, service.log


def test_state_dir_must_be_a_directory(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "examples", "serve", "--state-dir", str(tmp_path / "none"), "--socket", "x"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"argument --state-dir: {tmp_path / 'none'} is not a directory "
                                          "(create it first, mode 0700)")  # fmt: skip
