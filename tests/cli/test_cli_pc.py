"""``python -m examples.pc``: every run ends with one line on stderr saying why, with the exit status its
--help lists; a service without the PC's platform block is refused at once with the command that fixes it.

The guests are a few instructions at the reset vector, built here (the debug console at 0xE9, the exit
device at 0x501); SeaBIOS is booted only against a service that cannot run it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_process import SERVICE_TESTS, ServiceProcess

from examples.pc import EXIT_STATUSES, FAILED, SEEN, TIMED_OUT
from transports.kvm import kvm_available

PROG = "python -m examples.pc"
SEABIOS = Path("/usr/share/seabios/bios.bin")
KVM_REASON = kvm_available()
requires_kvm = pytest.mark.skipif(KVM_REASON is not None, reason=f"KVM not usable here: {KVM_REASON}")
requires_seabios = pytest.mark.skipif(not SEABIOS.exists(), reason=f"{SEABIOS} is missing (apt-get install seabios)")
RUN_TIMEOUT = 240  # seconds for a subprocess: generous, a loaded machine is slow (nothing here measures time)


def rom(code: bytes) -> bytes:
    """A 64 KiB BIOS image: ``code`` at offset 0, and at the reset vector (0xFFF0) a near jump to it."""
    image = bytearray(0x10000)
    image[: len(code)] = code
    image[0xFFF0:0xFFF3] = b"\xe9\x0d\x00"  # jmp 0x0000 (0xFFF3 + 0x000D wraps to 0)
    return bytes(image)


def debugcon(text: bytes) -> bytes:
    """mov dx, 0xE9; then mov al, byte; out dx, al for each byte."""
    return b"\xba\xe9\x00" + b"".join(b"\xb0" + bytes([byte]) + b"\xee" for byte in text)


def exit_device(value: int) -> bytes:
    """mov dx, 0x501; mov al, value; out dx, al; hlt."""
    return b"\xba\x01\x05\xb0" + bytes([value]) + b"\xee\xf4"


CLI_HLT = b"\xfa\xf4"  # cli; hlt: nothing can wake it
SPIN = b"\xeb\xfe"  # jmp $


def run_pc(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "examples.pc", *args], capture_output=True, timeout=RUN_TIMEOUT, check=False
    )


def one_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The single line on stderr (asserting there is exactly one, and no traceback)."""
    stderr = result.stderr.decode()
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    return stderr.rstrip("\n")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return tmp_path / "bios.bin"


@requires_kvm
def test_the_guest_reports_success_on_the_exit_device(image: Path) -> None:
    image.write_bytes(rom(debugcon(b"hi\n") + exit_device(0)))
    result = run_pc("--bios", str(image), "--timeout", str(RUN_TIMEOUT - 60))
    assert (result.returncode, result.stdout) == (1, b"hi\n")
    assert one_line(result) == (
        f"{PROG}: the guest wrote 0x0 to the exit device: exit status 1 = (0x0 << 1) | 1, as with QEMU's isa-debug-exit"
    )


@requires_kvm
def test_another_exit_value_and_output_without_a_newline(image: Path) -> None:
    image.write_bytes(rom(debugcon(b"hi") + exit_device(0x2A)))
    result = run_pc("--bios", str(image), "--timeout", str(RUN_TIMEOUT - 60))
    # The closing line starts a line of its own: the output's open line is ended first.
    assert (result.returncode, result.stdout) == (0x55, b"hi\n")
    assert one_line(result) == (
        f"{PROG}: the guest wrote 0x2a to the exit device: exit status 85 = (0x2a << 1) | 1, "
        "as with QEMU's isa-debug-exit"
    )


@requires_kvm
def test_until_text_seen(image: Path) -> None:
    image.write_bytes(rom(debugcon(b"ready\n") + SPIN))
    result = run_pc("--bios", str(image), "--until", "ready", "--timeout", str(RUN_TIMEOUT - 60))
    assert result.returncode == SEEN
    assert one_line(result) == f"{PROG}: the guest printed 'ready' (exit status 0)"


@requires_kvm
def test_a_vcpu_that_stops_for_good(image: Path) -> None:
    image.write_bytes(rom(CLI_HLT))
    result = run_pc("--bios", str(image), "--timeout", str(RUN_TIMEOUT - 60))
    assert (result.returncode, result.stdout) == (FAILED, b"")
    line = one_line(result)
    assert line.startswith(f"{PROG}: error: ") and line.endswith(f"(exit status {FAILED})")
    assert "HLT with interrupts disabled" in line


@requires_kvm
def test_the_timeout(image: Path) -> None:
    image.write_bytes(rom(SPIN))
    result = run_pc("--bios", str(image), "--timeout", "1")
    assert result.returncode == TIMED_OUT
    assert one_line(result) == f"{PROG}: error: timed out after 1 s (exit status {TIMED_OUT})"


@pytest.fixture
def plain_service(tmp_path: Path) -> Iterator[Path]:
    """A plain ``serve`` of some other devices (tests/service/service_devices.py): no platform block."""
    socket = tmp_path / "plain.sock"
    service = ServiceProcess(tmp_path, "--device", "service_devices:router", socket=socket, cwd=SERVICE_TESTS)
    try:
        yield socket
    finally:
        assert service.stop() == 0, service.log


@requires_kvm
@requires_seabios
def test_a_service_without_the_platform_block_is_refused_at_once(plain_service: Path) -> None:
    result = run_pc("--bios", str(SEABIOS), "--backend", f"unix:{plain_service}", "--timeout", str(RUN_TIMEOUT - 60))
    assert (result.returncode, result.stdout) == (FAILED, b"")  # not a byte of the guest's (0xFF) console
    assert one_line(result) == (
        f"{PROG}: error: the service at {plain_service} has no PC platform block (ports 0xef0-0xeff: interrupts, "
        f"timers, exit device, console); start it with: python -m examples serve --socket {plain_service} "
        "--device examples.pc_remote_devices:pc_devices"
    )


@requires_kvm
def test_the_exit_device_through_the_service(tmp_path: Path, image: Path) -> None:
    # The command the refusal above prints, run: the same guest ends the same way through serve.
    socket = tmp_path / "pc.sock"
    env = dict(os.environ, PC_DISK="")
    service = ServiceProcess(
        tmp_path, "--device", "examples.pc_remote_devices:pc_devices", socket=socket, env=env, ready_timeout=60
    )
    try:
        image.write_bytes(rom(debugcon(b"hi\n") + exit_device(0)))
        result = run_pc("--bios", str(image), "--backend", f"unix:{socket}", "--timeout", str(RUN_TIMEOUT - 60))
    finally:
        assert service.stop() == 0, service.log
    assert (result.returncode, result.stdout) == (1, b"hi\n")
    assert one_line(result) == (
        f"{PROG}: the guest wrote 0x0 to the exit device: exit status 1 = (0x0 << 1) | 1, as with QEMU's isa-debug-exit"
    )


@requires_kvm
def test_no_service_at_the_socket(tmp_path: Path, image: Path) -> None:
    image.write_bytes(rom(SPIN))
    socket = tmp_path / "none.sock"
    result = run_pc("--bios", str(image), "--backend", f"unix:{socket}")
    assert (result.returncode, result.stdout) == (FAILED, b"")
    assert one_line(result) == (
        f"{PROG}: error: no service at {socket}: there is no such file (start a service there with: "
        f"python -m examples serve --socket {socket} --device examples.pc_remote_devices:pc_devices)"
    )


@requires_kvm
def test_a_bios_image_that_cannot_be_used(tmp_path: Path, image: Path) -> None:
    missing = run_pc("--bios", str(tmp_path / "none.bin"))
    assert missing.returncode == FAILED
    assert (
        one_line(missing)
        == f"{PROG}: error: cannot read the BIOS image {tmp_path / 'none.bin'}: No such file or directory"
    )
    image.write_bytes(bytes(1000))
    short = run_pc("--bios", str(image))
    assert short.returncode == FAILED
    assert one_line(short) == (
        f"{PROG}: error: the BIOS image {image} is 1000 bytes; a BIOS image is a multiple of 64 KiB up to 16 MiB"
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("--memory", "1"), "argument --memory: 1 MiB is outside 2..3584"),
        (("--memory", "lots"), "argument --memory: 'lots' is not a whole number of MiB"),
        (("--timeout", "-1"), "argument --timeout: -1 is out of range (0 or more seconds)"),
        (("--backend", "tcp:1"), "argument --backend: 'tcp:1' is neither inproc nor unix:PATH"),
        (("--backend", "unix:"), "argument --backend: 'unix:' is neither inproc nor unix:PATH"),
        (
            ("--backend", "unix:/tmp/s.sock", "--disk", "d.img"),
            "--disk is for the in-process backend: give the service its disk as PC_DISK=PATH",
        ),
    ],
)
def test_usage_errors_are_one_line(args: tuple[str, ...], line: str) -> None:
    # Checked before KVM or the BIOS is looked at.
    result = run_pc("--bios", "/nonexistent/bios.bin", *args)
    assert result.returncode == FAILED
    assert one_line(result) == f"{PROG}: error: {line}"


def test_help_lists_the_exit_statuses() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.pc", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert (result.returncode, result.stderr) == (0, "")
    block = result.stdout.split("exit status:\n", 1)[1]
    listed = {
        m[1]: " ".join(m[2].split()) for m in re.finditer(r"^  (\d[\d,. ]*?) {2,}(.+(?:\n {4,}.+)*)", block, re.M)
    }
    assert listed == {str(status): meaning for status, meaning in EXIT_STATUSES.items()}
