"""Shared skip conditions for the KVM tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from transports.kvm import kvm_available

GUESTS_DIR = Path(__file__).resolve().parents[2] / "examples" / "guests"

KVM_REASON = kvm_available()
requires_kvm = pytest.mark.skipif(KVM_REASON is not None, reason=f"KVM not usable here: {KVM_REASON}")

NASM = shutil.which("nasm")
requires_nasm = pytest.mark.skipif(NASM is None, reason="nasm is not installed (apt-get install nasm)")

QEMU = shutil.which("qemu-system-x86_64")
requires_qemu = pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
)
