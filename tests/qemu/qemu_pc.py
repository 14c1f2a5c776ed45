"""The example PC set up as QEMU's traces were recorded.

The registers where the two boards may differ, with their reasons, are all in
the allow file (allow-qemu-pc.toml), the ones behind an index port included.
"""

from __future__ import annotations

import gzip
from datetime import UTC, datetime
from pathlib import Path

from dispatcher.clock import VirtualClock
from examples.pc_devices import PC, build_pc

HERE = Path(__file__).resolve().parent
SEABIOS_TRACE = HERE / "seabios-blank-disk.log.gz"
MBR_TRACE = HERE / "mbr-checksum.log.gz"
MBR_DISK = HERE / "mbr-disk.img.gz"
ALLOW = HERE / "allow-qemu-pc.toml"
RTC_START = datetime(2024, 1, 1, tzinfo=UTC)  # record_qemu_traces.py gives QEMU -rtc base=2024-01-01T00:00:00
BLANK_DISK_SIZE = 1 << 20


def qemu_pc(clock: VirtualClock, disk: bytearray) -> PC:
    """The example PC with QEMU's RTC start and ``disk`` on the primary ATA channel, its timers on ``clock``."""
    pc = build_pc(clock=clock, disk=disk, start_time=RTC_START)
    clock.watch(pc)
    return pc


def mbr_disk() -> bytearray:
    """The disk image QEMU booted for the MBR trace."""
    return bytearray(gzip.decompress(MBR_DISK.read_bytes()))


def seabios_machine(clock: VirtualClock) -> PC:
    """The machine of seabios-blank-disk.log.gz, for ``intercept-dispatch replay --device qemu_pc:seabios_machine``."""
    return qemu_pc(clock, bytearray(BLANK_DISK_SIZE))


def mbr_machine(clock: VirtualClock) -> PC:
    """The machine of mbr-checksum.log.gz, for ``intercept-dispatch replay --device qemu_pc:mbr_machine``."""
    return qemu_pc(clock, mbr_disk())
