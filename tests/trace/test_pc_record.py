"""``python -m examples.pc --record FILE``: a SeaBIOS boot on KVM, recorded, read back and replayed exactly.

Each boot runs the command line as a user would; nothing here measures
time (the timeouts are generous limits for a loaded machine).
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dispatcher import decode_completion, decode_message
from dispatcher.clock import VirtualClock
from dispatcher.replay import replay
from dispatcher.trace import Trace, read_trace
from dispatcher.trace_records import Acknowledge, ClockAdvance, Completion, Intercept, IrqEdge, MemoryWrite
from examples.guests import mbr_checksum_image
from examples.pc import replay_machine
from transports.kvm import kvm_available

SEABIOS = Path("/usr/share/seabios/bios.bin")
KVM_REASON = kvm_available()
requires_kvm = pytest.mark.skipif(KVM_REASON is not None, reason=f"KVM not usable here: {KVM_REASON}")
requires_seabios = pytest.mark.skipif(not SEABIOS.exists(), reason=f"{SEABIOS} is missing (apt-get install seabios)")
BOOT_TIMEOUT = 240  # seconds: SeaBIOS needs ~4 s here when the machine is idle, minutes when it is not


def run_pc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examples.pc", "--bios", str(SEABIOS), "--timeout", str(BOOT_TIMEOUT), *args],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60,
    )  # fmt: skip


def check_pairs(trace: Trace) -> int:
    """Every intercept is followed by its VP's completion before the next intercept (one vCPU); returns how many."""
    pending: Intercept | None = None
    count = 0
    for event in trace.events:
        if isinstance(event, Intercept):
            assert pending is None, "an intercept without a completion"
            pending = event
        elif isinstance(event, Completion):
            assert pending is not None, "a completion without an intercept"
            assert decode_completion(event.frame).vp_index == decode_message(pending.frame).vp_index == 0
            pending, count = None, count + 1
    return count


def replayed(trace: Trace) -> Any:
    clock = VirtualClock(trace.metadata["start_ns"])
    return replay(trace.events, replay_machine(clock, **trace.metadata["machine_args"]), clock=clock)


@requires_kvm
@requires_seabios
def test_a_seabios_boot_is_recorded_and_replays_exactly(tmp_path: Path) -> None:
    path = tmp_path / "boot.trace"
    result = run_pc("--until", "No bootable device", "--record", str(path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    trace = read_trace(path)
    assert trace.complete
    metadata = trace.metadata
    assert (metadata["source"], metadata["machine"], metadata["clock"]) == (
        "examples.pc",
        "examples.pc:replay_machine",
        "virtual",
    )
    assert metadata["machine_args"]["memory_size"] == 64 << 20 and metadata["machine_args"]["disk"] is None
    assert metadata["bios"] == str(SEABIOS)
    assert check_pairs(trace) == trace.intercepts > 1000
    ports = {decode_message(e.frame).port_number for e in trace.events if isinstance(e, Intercept)}
    assert {0x40, 0x70, 0x71, 0x402, 0xCF8, 0xCFC} <= ports  # PIT, RTC, debug console, PCI
    assert any(isinstance(e, ClockAdvance) for e in trace.events)
    assert any(isinstance(e, Acknowledge) and e.vector == 0x08 for e in trace.events)  # IRQ 0 delivered
    assert {(e.line, e.level) for e in trace.events if isinstance(e, IrqEdge)} >= {(0, True), (0, False)}
    times = [e.virtual_ns for e in trace.events]
    assert times == sorted(times)

    outcome = replayed(trace)
    assert outcome.replayed == trace.intercepts
    assert outcome.ok, outcome.differences[:1]
    assert outcome.irqs_compared  # every edge of the devices' lines, in order, as recorded


@requires_kvm
@requires_seabios
def test_an_mbr_booted_from_disk_is_recorded_with_its_sectors(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(mbr_checksum_image(64) + random.Random(2024).randbytes(64 * 512) + bytes(512 * 64))
    before = image.read_bytes()
    path = tmp_path / "mbr.trace.gz"
    result = run_pc("--disk", str(image), "--record", str(path))
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr  # the MBR's "success" (exit device)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    trace = read_trace(path)
    assert trace.complete and trace.metadata["machine_args"]["disk"] == str(image)
    written = b"".join(e.data for e in trace.events if isinstance(e, MemoryWrite))
    assert before[:512] in written and before[512 : 512 * 65] in written  # the MBR, then the sectors it read
    outcome = replayed(trace)
    assert outcome.ok, outcome.differences[:1]
    assert image.read_bytes() == before  # the replay read the image, never wrote it


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--restore", "x.snapshot"), "--record starts from a fresh PC"),
        (("--backend", "unix:/nonexistent.sock"), "record there (serve --record)"),
    ],
)
def test_record_with_what_cannot_be_replayed_is_a_usage_error(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    command = [sys.executable, "-m", "examples.pc", "--record", str(tmp_path / "t.trace"), *args]
    if "--restore" not in args:
        command += ["--bios", str(SEABIOS)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m examples.pc: error: ") and message in lines[0], lines
    assert not (tmp_path / "t.trace").exists()
