"""QEMU's devices against the example PC: SeaBIOS's and an MBR's port accesses under QEMU, replayed.

Every read must be answered as QEMU answered, except the differences the allow
file accepts (each with its reason) at the registers qemu_pc.py lists.
The traces are committed; record_qemu_traces.py re-records them.
"""

from __future__ import annotations

import pytest
from qemu_pc import ALLOW, BLANK_DISK_SIZE, MBR_TRACE, SEABIOS_TRACE, mbr_disk, qemu_pc, unexplained

from dispatcher.allow import load_allow
from dispatcher.clock import VirtualClock
from dispatcher.qemu_log import QemuAccess, qemu_events, read_qemu_records
from dispatcher.replay import ReplayResult, format_divergence, replay
from dispatcher.trace_records import Acknowledge


def run(trace: object, disk: bytearray) -> tuple[ReplayResult, list[str]]:
    records = read_qemu_records(str(trace))
    clock = VirtualClock()
    result = replay(qemu_events(records), qemu_pc(clock, disk), allow=load_allow(ALLOW), clock=clock)
    return result, unexplained(result.allowed, records)


def check(result: ReplayResult, unexplained_lines: list[str], accesses: int) -> None:
    assert result.ok, "\n\n".join(format_divergence(d) for d in result.differences[:5])
    assert not unexplained_lines, "\n".join(unexplained_lines[:20])
    assert result.replayed == accesses
    assert result.not_compared == 0 and not result.failures


def count_accesses(trace: object) -> int:
    return sum(isinstance(record, QemuAccess) for record in read_qemu_records(str(trace)))


def test_seabios_to_no_bootable_device_answers_as_qemu() -> None:
    result, lines = run(SEABIOS_TRACE, bytearray(BLANK_DISK_SIZE))
    check(result, lines, count_accesses(SEABIOS_TRACE))


def test_an_mbr_reading_sectors_through_int13h_answers_as_qemu() -> None:
    result, lines = run(MBR_TRACE, mbr_disk())
    check(result, lines, count_accesses(MBR_TRACE))


def test_a_sector_that_differs_is_not_hidden_by_the_allowed_identify_data() -> None:
    disk = mbr_disk()
    disk[512 + 100] ^= 0xFF  # a byte of the first sector the MBR reads
    result, lines = run(MBR_TRACE, disk)
    assert result.ok  # the allow file covers port 0x1F0 whole; the register check narrows it
    assert len(lines) == 1 and "ata command 0x20 word 50" in lines[0]


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
