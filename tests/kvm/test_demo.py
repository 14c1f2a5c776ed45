"""``python -m examples demo`` boots the hello guest on KVM, and says so when it cannot."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kvm_support import requires_kvm

import transports.kvm
from examples.demo import main


@requires_kvm
def test_the_demo_boots_the_hello_guest_on_kvm() -> None:
    result = subprocess.run([sys.executable, "-m", "examples", "demo"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on a KVM vCPU" in result.stdout
    assert "serial output: Hello from the guest" in result.stdout and "demo passed" in result.stdout


def test_without_kvm_the_demo_says_why_and_runs_on_a_fake_vp(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(transports.kvm, "kvm_available", lambda path="/dev/kvm": "cannot open /dev/kvm: test")
    assert main() == 0
    out = capsys.readouterr().out
    assert "KVM is not usable here (cannot open /dev/kvm: test); running the demo on a fake VP instead" in out
    assert "Hello from the guest, through intercept-dispatch!" in out and "demo passed" in out
