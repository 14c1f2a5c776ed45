"""QEMU's devices against the example PC: SeaBIOS's and an MBR's port accesses under QEMU, replayed.

Every read must be answered as QEMU answered, except the differences the allow
file accepts, each at the registers it names and with its reason.
The traces are committed; record_qemu_traces.py re-records them.
"""

from __future__ import annotations

import pytest
from qemu_pc import ALLOW, BLANK_DISK_SIZE, MBR_TRACE, SEABIOS_TRACE, mbr_disk, qemu_pc

from dispatcher.allow import load_allow
from dispatcher.clock import VirtualClock
from dispatcher.qemu_log import QemuAccess, qemu_events, read_qemu_records
from dispatcher.replay import ReplayResult, format_divergence, replay
from dispatcher.trace_records import Acknowledge


def run(trace: object, disk: bytearray) -> ReplayResult:
    clock = VirtualClock()
    return replay(
        qemu_events(read_qemu_records(str(trace))), qemu_pc(clock, disk), allow=load_allow(ALLOW), clock=clock
    )


def check(result: ReplayResult, accesses: int) -> None:
    assert result.ok, "\n\n".join(format_divergence(d) for d in result.differences[:5])
    assert result.replayed == accesses
    assert result.not_compared == 0 and not result.failures


def count_accesses(trace: object) -> int:
    return sum(isinstance(record, QemuAccess) for record in read_qemu_records(str(trace)))


def test_seabios_to_no_bootable_device_answers_as_qemu() -> None:
    check(run(SEABIOS_TRACE, bytearray(BLANK_DISK_SIZE)), count_accesses(SEABIOS_TRACE))


def test_an_mbr_reading_sectors_through_int13h_answers_as_qemu() -> None:
    check(run(MBR_TRACE, mbr_disk()), count_accesses(MBR_TRACE))


def test_a_sector_that_differs_is_not_hidden_by_the_allowed_identify_data() -> None:
    disk = mbr_disk()
    disk[512 + 100] ^= 0xFF  # a byte of the first sector the MBR reads (word 50 after READ SECTORS)
    result = run(MBR_TRACE, disk)
    assert not result.ok
    [difference] = result.differences
    assert (difference.port, difference.size, difference.fields) == (0x1F0, 2, ("rax",))
    assert difference.allowed is None
    assert any("IDENTIFY DEVICE" in (allowed.allowed or "") for allowed in result.allowed)


def test_the_seabios_trace_holds_the_timer_interrupts_qemu_acknowledged() -> None:
    vectors = [
        event.vector for event in qemu_events(read_qemu_records(str(SEABIOS_TRACE))) if type(event) is Acknowledge
    ]
    assert len(vectors) >= 5 and set(vectors) == {8}


def test_the_replay_command_reads_a_qemu_log(capsys: pytest.CaptureFixture[str]) -> None:
    from transports.testbench.replay_command import main

    here = str(ALLOW.parent)
    status = main([str(MBR_TRACE), "--device", "qemu_pc:mbr_machine", "--device-path", here, "--allow", str(ALLOW)])
    assert status == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"replayed {count_accesses(MBR_TRACE)} intercepts, 0 differ"
