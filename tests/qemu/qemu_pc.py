"""The example PC set up as QEMU's traces were recorded, and the registers where the two may differ.

The allow file (allow-qemu-pc.toml) names ports. On a data port behind an
index port (CMOS 0x71 behind 0x70, PCI 0xCFC-0xCFF behind 0xCF8, the ATA data
port 0x1F0 behind the command register 0x1F7) a port is too wide a net, so
:func:`unexplained` checks each allowed difference there against the
registers listed here with their reasons.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from dispatcher.clock import VirtualClock
from dispatcher.qemu_log import QemuAccess, QemuInterrupt
from dispatcher.replay import Divergence
from examples.pc_devices import PC, build_pc

HERE = Path(__file__).resolve().parent
SEABIOS_TRACE = HERE / "seabios-blank-disk.log.gz"
MBR_TRACE = HERE / "mbr-checksum.log.gz"
MBR_DISK = HERE / "mbr-disk.img.gz"
ALLOW = HERE / "allow-qemu-pc.toml"
RTC_START = datetime(2024, 1, 1, tzinfo=UTC)  # record_qemu_traces.py gives QEMU -rtc base=2024-01-01T00:00:00
BLANK_DISK_SIZE = 1 << 20

CMOS = {
    **{index: "the clock's time: its seconds roll over at moments the two runs do not share" for index in range(10)},
    0x0A: "register A's UIP bit, set for the 244 us before each update: a matter of time",
    0x0C: "register C's PF bit, set at the periodic rate whatever PIE says (MC146818 datasheet); QEMU needs PIE",
    0x38: "QEMU's boot-order flags (Bochs BIOS convention); the example leaves them 0",
    0x3D: "QEMU's boot-order devices (Bochs BIOS convention); the example leaves them 0",
}
PCI = {
    (0, 0, 0x04): "host bridge PCICMD: 0006h per the 82441FX datasheet (memory and bus master hardwired); QEMU 0",
    (0, 0, 0x2C): "subsystem vendor 1af4 (Red Hat) QEMU gives every function; the example's is 0",
    (0, 0, 0x2E): "subsystem ID 1100 QEMU gives every function; the example's is 0",
    (1, 1, 0x08): "IDE programming interface bit 7 (bus master): QEMU's IDE has DMA, the example's does not",
    (1, 1, 0x20): "IDE BAR4 (the bus master registers) that QEMU's IDE has and the example's does not",
}
PCI_FUNCTIONS = {(1, 3): "QEMU's PIIX4 power-management function, which the example PC does not have"}
IDENTIFY_DEVICE = 0xEC


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


def registers(records: Sequence[QemuAccess | QemuInterrupt]) -> list[str | None]:
    """For each record, where its access lands behind an index port (for example "cmos 0x38"), else None."""
    where: list[str | None] = []
    cmos = address = command = word = 0
    for record in records:
        here = None
        if isinstance(record, QemuAccess):
            port = record.port
            if record.is_write and port == 0x70:
                cmos = record.value & 0x7F
            elif record.is_write and port == 0xCF8 and record.size == 4:
                address = record.value
            elif record.is_write and port == 0x1F7:
                command, word = record.value, 0
            elif port == 0x71:
                here = f"cmos {cmos:#04x}"
            elif 0xCFC <= port <= 0xCFF:
                device, function = address >> 11 & 0x1F, address >> 8 & 7
                here = f"pci {address >> 16 & 0xFF:02x}:{device:02x}.{function} {(address & 0xFC) + (port & 3):#04x}"
            elif port == 0x1F0 and not record.is_write:
                here = f"ata command {command:#04x} word {word}"
                word += record.size // 2
        where.append(here)
    return where


def _reason(register: str) -> str | None:
    kind, *rest = register.split()
    if kind == "cmos":
        return CMOS.get(int(rest[0], 16))
    if kind == "pci":
        bus, slot = rest[0].split(":")
        device, function = (int(part, 16) for part in slot.split("."))
        if int(bus, 16) != 0:
            return None
        return PCI_FUNCTIONS.get((device, function)) or PCI.get((device, function, int(rest[1], 16)))
    if int(rest[1], 16) == IDENTIFY_DEVICE:
        return "IDENTIFY DEVICE data (see the allow file)"
    return None


def unexplained(allowed: Iterable[Divergence], records: Sequence[QemuAccess | QemuInterrupt]) -> list[str]:
    """Allowed differences behind an index port at a register not listed here: each as a line for people."""
    where = registers(records)
    lines = []
    for divergence in allowed:
        # Two events per record: an access's intercept and completion, an acknowledge's clock advance and vector.
        register = where[divergence.index // 2]
        if register is not None and _reason(register) is None:
            record = records[divergence.index // 2]
            lines.append(f"line {record.line}: {register}: {divergence.expected} != {divergence.got}")
    return lines
