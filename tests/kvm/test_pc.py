"""``python -m examples.pc`` boots real firmware: SeaBIOS, and an MBR that reads sectors through INT 13h.

Each boot runs the command line as a user would, in process and with the
devices in a ``python -m examples serve`` process. SeaBIOS takes a few
seconds on an idle machine and much longer on a loaded one, hence the
generous timeouts (nothing here measures time).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kvm_support import requires_kvm
from service_process import ServiceProcess

from examples.guests import mbr_checksum, mbr_checksum_image

SEABIOS = Path("/usr/share/seabios/bios.bin")
requires_seabios = pytest.mark.skipif(not SEABIOS.exists(), reason=f"{SEABIOS} is missing (apt-get install seabios)")
pytestmark = [requires_kvm, requires_seabios]

BOOT_TIMEOUT = 240  # seconds: SeaBIOS needs ~4 s here when the machine is idle, minutes when it is not
SECTORS = 64


def run_pc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examples.pc", "--bios", str(SEABIOS), "--timeout", str(BOOT_TIMEOUT), *args],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60,
    )  # fmt: skip


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, int]:
    """An MBR that checksums 64 sectors, then 64 sectors of random data; and the checksum the host computes."""
    data = random.Random(2024).randbytes(SECTORS * 512)
    image = tmp_path / "disk.img"
    image.write_bytes(mbr_checksum_image(SECTORS) + data + bytes(512 * 64))
    return image, mbr_checksum(data)


def serve(tmp_path: Path, disk: Path | None = None) -> Iterator[str]:
    socket = tmp_path / "pc.sock"
    env = dict(os.environ, PC_DISK=str(disk) if disk is not None else "")
    service = ServiceProcess(
        tmp_path, "--device", "examples.pc_remote_devices:pc_devices", socket=socket, env=env, ready_timeout=60
    )
    try:
        yield f"unix:{socket}"
    finally:
        service.stop()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[str]:
    yield from serve(tmp_path)


@pytest.fixture
def disk_service(tmp_path: Path, disk: tuple[Path, int]) -> Iterator[str]:
    yield from serve(tmp_path, disk[0])


def check_seabios(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "SeaBIOS (version" in result.stdout
    assert "No bootable device" in result.stdout


def test_seabios_boots_to_no_bootable_device() -> None:
    check_seabios(run_pc("--until", "No bootable device"))


def test_seabios_boots_through_serve(service: str) -> None:
    check_seabios(run_pc("--backend", service, "--until", "No bootable device"))


def check_mbr(result: subprocess.CompletedProcess[str], expected: int) -> None:
    assert "SeaBIOS (version" in result.stdout and "Booting from Hard Disk" in result.stdout, result.stderr
    assert f"MBR checksum {expected:08X}\n" in result.stdout, result.stdout[-2000:] + result.stderr
    assert result.returncode == 1  # isa-debug-exit: (0 << 1) | 1, the MBR's "success"


def test_an_mbr_reads_sectors_through_int13h(disk: tuple[Path, int]) -> None:
    image, expected = disk
    check_mbr(run_pc("--disk", str(image)), expected)


def test_an_mbr_reads_sectors_through_serve(disk: tuple[Path, int], disk_service: str) -> None:
    check_mbr(run_pc("--backend", disk_service), disk[1])


def test_a_missing_bios_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.pc", "--bios", str(tmp_path / "none.bin")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "cannot read the BIOS image" in result.stderr


def test_a_spinning_guest_ends_at_the_timeout(tmp_path: Path) -> None:
    bios = tmp_path / "spin.bin"
    bios.write_bytes(bytes(0xFFF0) + b"\xeb\xfe".ljust(16, b"\x90"))  # the reset vector: jmp $
    result = subprocess.run(
        [sys.executable, "-m", "examples.pc", "--bios", str(bios), "--timeout", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 124 and "timed out after 1 s" in result.stderr
