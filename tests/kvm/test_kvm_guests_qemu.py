"""The test guests run unchanged under QEMU (TCG): an independent check of what they assert.

If a guest's own checks pass here but fail under KVM + this project, the
difference is in KVM or the project, not in the guest.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from kvm_support import GUESTS_DIR, NASM, QEMU, requires_nasm, requires_qemu

pytestmark = [requires_nasm, requires_qemu]


def _run_under_qemu(name: str, tmp_path: Path) -> tuple[int, bytes]:
    rom = tmp_path / "shim.rom"
    guest = GUESTS_DIR / f"{name}.bin"
    subprocess.run(
        [str(NASM), "-f", "bin", f"-DGUEST='{guest}'".replace("'", '"'), "-o", str(rom), "qemu_shim.asm"],
        cwd=GUESTS_DIR,
        check=True,
    )
    serial = tmp_path / "serial.txt"
    proc = subprocess.run(
        [
            str(QEMU),
            "-machine",
            "pc",
            "-accel",
            "tcg",
            "-cpu",
            "qemu64",
            "-nodefaults",
            "-display",
            "none",
            "-bios",
            str(rom),
            "-device",
            "isa-debug-exit,iobase=0x501,iosize=1",
            "-device",
            "pc-testdev",
            "-serial",
            f"file:{serial}",
        ],
        timeout=120,
        check=False,
    )
    # isa-debug-exit makes QEMU exit with (status << 1) | 1.
    assert proc.returncode & 1, f"QEMU exited with {proc.returncode}, not through isa-debug-exit"
    return proc.returncode >> 1, serial.read_bytes() if serial.exists() else b""


def test_hello_real_under_qemu(tmp_path: Path) -> None:
    status, serial = _run_under_qemu("hello_real", tmp_path)
    assert serial == b"Hello from the guest\n"
    assert status == 0


@pytest.mark.parametrize("name", ["io_prot32", "io_long64"])
def test_io_self_checks_pass_under_qemu(name: str, tmp_path: Path) -> None:
    status, _ = _run_under_qemu(name, tmp_path)
    assert status == 0, f"{name}: check {status} failed under QEMU"
