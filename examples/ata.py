"""An ATA channel with PIO hard disks, from ATA/ATAPI-6 (T13 1410D).

Ports, from the command block base (0x1F0 primary, 0x170 secondary) and the
control block at base + 0x206 (0x3F6, 0x376):

=====  ============================  =============================
port   read                          write
=====  ============================  =============================
+0     Data (16 or 32 bits)          Data
+1     Error                         Features
+2     Sector Count                  Sector Count
+3     LBA Low (CHS: sector)         LBA Low
+4     LBA Mid (CHS: cylinder low)   LBA Mid
+5     LBA High (CHS: cylinder high) LBA High
+6     Device (DEV bit 4, LBA bit 6) Device
+7     Status (clears INTRQ)         Command
+206   Alternate Status              Device Control (nIEN, SRST, HOB)
=====  ============================  =============================

The task file registers are written to both devices, as on the cable; Sector
Count and the LBA registers keep the previous value for 48-bit commands,
read back with HOB set. A dword access to the data port moves two words (the
PIIX IDE controller splits it); other registers are 8 bits wide and a wider
access reaches them byte by byte. A byte access to the data port reads 0xFF
and writes nothing, as QEMU does. ``REP INSW/INSD`` and ``OUTSW/OUTSD`` on the
data port reach a bulk handler that moves a whole chunk (up to the
dispatcher's element limit, across DRQ blocks) in one call.

Commands: IDENTIFY DEVICE; READ/WRITE SECTORS and MULTIPLE and their EXT
forms in CHS, LBA28 and LBA48; READ VERIFY (EXT); SEEK; RECALIBRATE;
INITIALIZE DEVICE PARAMETERS; SET MULTIPLE MODE; SET FEATURES (write cache,
read look-ahead, transfer mode, revert to defaults); EXECUTE DEVICE
DIAGNOSTIC; READ NATIVE MAX ADDRESS (EXT); FLUSH CACHE (EXT); CHECK POWER
MODE; IDLE/STANDBY (IMMEDIATE). Others, and the packet commands an ATA disk
does not implement (IDENTIFY PACKET DEVICE, PACKET, DEVICE RESET), are
aborted. Commands take no time: BSY is seen only while SRST is held.

When device 1 is absent and selected, device 0 answers for it: Status,
Alternate Status and Error read 0, the other registers read what was
written, and commands other than EXECUTE DEVICE DIAGNOSTIC are ignored (as
QEMU does). Device 1 without device 0 is not modelled.

Device state (kind ``ata-channel``, version 1): the task file registers,
Device Control, and per device its status, error, pending interrupt,
settings (multiple count, write cache, look-ahead, CHS translation) and the
PIO transfer in progress with its DRQ block. The disk image is not device
state: it is the disk's media, kept by whoever owns the image, and a restore
only checks that the attached disk has the number of sectors the state was
saved with.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dispatcher import BulkAccess, IrqLine, PortAccess, StateFields, on_bulk, on_port

__all__ = ["SECTOR_SIZE", "AtaChannel", "AtaDisk"]

SECTOR_SIZE = 512
MAX_MULTIPLE = 16
LBA28_LIMIT = 0x0FFF_FFFF

# Status
ERR, DRQ, DSC, DF, DRDY, BSY = 0x01, 0x08, 0x10, 0x20, 0x40, 0x80
# Error
ABRT, IDNF = 0x04, 0x10
# Device Control
NIEN, SRST, HOB = 0x02, 0x04, 0x80
# Device
DEV, LBA = 0x10, 0x40

READY = DRDY | DSC

_READ_COMMANDS = {0x20: (False, False), 0x21: (False, False), 0x24: (True, False), 0xC4: (False, True),
                  0x29: (True, True)}  # fmt: skip
_WRITE_COMMANDS = {0x30: (False, False), 0x31: (False, False), 0x34: (True, False), 0xC5: (False, True),
                   0x39: (True, True)}  # fmt: skip


def _ata_string(text: str, words: int) -> list[int]:
    # ATA strings put the first character of each pair in the high byte of the word.
    raw = text.encode("ascii")[: 2 * words].ljust(2 * words)
    return [raw[i] << 8 | raw[i + 1] for i in range(0, 2 * words, 2)]


def default_geometry(sectors: int) -> tuple[int, int, int]:
    """Cylinders, heads and sectors per track for ``sectors`` sectors (ATA/ATAPI-6 Annex B: 16 heads, 63 sectors
    per track, at most 16383 cylinders); small images get fewer heads so the geometry fits inside them."""
    per_track = min(63, sectors)
    heads = max(1, min(16, sectors // per_track))
    cylinders = min(16383, sectors // (heads * per_track))
    return cylinders, heads, per_track


class AtaDisk:
    """A hard disk: its media (a bytearray, or an image file mapped into memory) and identity.

    An image file's size is rounded down to whole sectors. ``geometry`` is
    the default (cylinders, heads, sectors per track) reported in IDENTIFY
    words 1, 3 and 6. Close a file-backed disk with :meth:`close`.
    """

    def __init__(
        self,
        image: bytearray | str | os.PathLike[str],
        *,
        read_only: bool = False,
        model: str = "intercept-dispatch ATA disk",
        serial: str = "ID-0001",
        firmware: str = "1.0",
        geometry: tuple[int, int, int] | None = None,
    ) -> None:
        self.read_only = read_only
        self._file = None
        if isinstance(image, bytearray):
            self.media: bytearray | mmap.mmap = image
            size = len(image)
        else:
            self._file = open(image, "rb" if read_only else "r+b")  # noqa: SIM115 (closed by close())
            size = os.fstat(self._file.fileno()).st_size
            size -= size % SECTOR_SIZE
            if size:
                access = mmap.ACCESS_READ if read_only else mmap.ACCESS_WRITE
                self.media = mmap.mmap(self._file.fileno(), size, access=access)
        self.sectors = size // SECTOR_SIZE
        if not self.sectors:
            self.close()
            raise ValueError(f"the image holds {size} bytes: not one {SECTOR_SIZE}-byte sector")
        self.geometry = geometry if geometry is not None else default_geometry(self.sectors)
        cylinders, heads, per_track = self.geometry
        if not (1 <= cylinders <= 65535 and 1 <= heads <= 16 and 1 <= per_track <= 255):
            raise ValueError(f"geometry {self.geometry} is outside 1-65535 cylinders, 1-16 heads, 1-255 sectors")
        self.model = model
        self.serial = serial
        self.firmware = firmware

    def read(self, lba: int, count: int) -> bytes:
        return bytes(self.media[lba * SECTOR_SIZE : (lba + count) * SECTOR_SIZE])

    def write(self, lba: int, data: bytes | bytearray) -> None:
        self.media[lba * SECTOR_SIZE : lba * SECTOR_SIZE + len(data)] = data

    def flush(self) -> None:
        if isinstance(self.media, mmap.mmap):
            self.media.flush()

    def close(self) -> None:
        if self._file is not None:
            media = getattr(self, "media", None)
            if isinstance(media, mmap.mmap):
                media.close()
            self._file.close()
            self._file = None

    def __enter__(self) -> AtaDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class _Transfer:
    """A PIO data command in progress: the DRQ block in ``buffer`` and what follows it."""

    write: bool
    lba: int
    remaining: int  # sectors not yet moved through the data port, the current block included
    block: int  # sectors per DRQ block
    buffer: bytearray
    position: int = 0


class _Drive:
    """One device on the channel: a disk and the state the ATA standard gives it."""

    def __init__(self, disk: AtaDisk, number: int) -> None:
        self.disk = disk
        self.number = number
        self.power_on()

    def power_on(self) -> None:
        """ATA/ATAPI-6 power-on: diagnostic code 01h in Error, multiple mode off, default CHS translation."""
        self.status = READY
        self.error = 0x01
        self.interrupt = False
        self.transfer: _Transfer | None = None
        self.multiple = 0
        self.write_cache = True
        self.look_ahead = True
        self.current = self.disk.geometry  # CHS translation set by INITIALIZE DEVICE PARAMETERS

    def save(self) -> dict[str, Any]:
        """This device's state (see the module's docstring)."""
        transfer = self.transfer
        return {
            "sectors": self.disk.sectors,
            "status": self.status,
            "error": self.error,
            "interrupt": self.interrupt,
            "multiple": self.multiple,
            "write_cache": self.write_cache,
            "look_ahead": self.look_ahead,
            "current": list(self.current),
            "transfer": None
            if transfer is None
            else {
                "write": transfer.write,
                "lba": transfer.lba,
                "remaining": transfer.remaining,
                "block": transfer.block,
                "buffer": transfer.buffer.hex(),
                "position": transfer.position,
            },
        }

    def check(self, f: StateFields) -> Callable[[], None]:
        """Check a saved device against this one; return what puts it here."""
        sectors = f.integer("sectors", 0, 1 << 48)
        if sectors != self.disk.sectors:
            raise f.error("sectors", f"is {sectors}, but the disk attached has {self.disk.sectors} sectors")
        status, error = f.integer("status", 0, 0xFF), f.integer("error", 0, 0xFF)
        interrupt, multiple = f.boolean("interrupt"), f.integer("multiple", 0, MAX_MULTIPLE)
        if multiple & (multiple - 1):
            raise f.error("multiple", f"is {multiple}, not 0 or a power of two")
        write_cache, look_ahead = f.boolean("write_cache"), f.boolean("look_ahead")
        current = f.ints("current", 1, 65535, max_length=3)
        if len(current) != 3 or current[1] > 16 or current[2] > 255:
            raise f.error("current", f"is {current}, not [cylinders, heads 1-16, sectors per track 1-255]")
        transfer: _Transfer | None = None
        t = f.optional_section("transfer")
        if t is not None:
            block = t.integer("block", 1, MAX_MULTIPLE)
            remaining = t.integer("remaining", 1, 0x10000)
            lba = t.integer("lba", 0, sectors - 1)
            if lba + remaining > sectors:
                raise t.error("remaining", f"is {remaining}: from LBA {lba} it runs past the disk's {sectors} sectors")
            # The DRQ block in the buffer is the next min(block, remaining) sectors.
            buffer = t.data("buffer", length=min(block, remaining) * SECTOR_SIZE)
            position = t.integer("position", 0, len(buffer) - 1)
            transfer = _Transfer(t.boolean("write"), lba, remaining, block, buffer, position)

        def apply() -> None:
            self.status, self.error, self.interrupt, self.multiple = status, error, interrupt, multiple
            self.write_cache, self.look_ahead = write_cache, look_ahead
            self.current = (current[0], current[1], current[2])
            self.transfer = transfer

        return apply


class AtaChannel:
    """One ATA channel (command block at ``io_base``, control block at ``io_base + 0x206``) and its devices.

    ``disks`` holds device 0 and optionally device 1. The channel drives
    ``irq`` (IRQ 14 on the primary channel) from the selected device's
    interrupt pending state while nIEN is clear.
    """

    state_kind = "ata-channel"
    state_version = 1
    oldest_state_version = 1
    _REGISTERS = ("features", "count", "lba_low", "lba_mid", "lba_high", "hob_count", "hob_lba_low", "hob_lba_mid",
                  "hob_lba_high", "device", "control")  # fmt: skip

    def __init__(
        self, disks: AtaDisk | Sequence[AtaDisk | None], *, io_base: int = 0x1F0, irq: IrqLine | None = None
    ) -> None:
        listed = [disks] if isinstance(disks, AtaDisk) else list(disks)
        if not 1 <= len(listed) <= 2 or listed[0] is None:
            raise ValueError("an ATA channel takes device 0 and optionally device 1")
        self.io_base = io_base
        self.irq = irq if irq is not None else IrqLine(line=14, name=f"ATA@{io_base:#x}")
        self.drives: list[_Drive | None] = [_Drive(d, i) if d is not None else None for i, d in enumerate(listed)]
        if len(self.drives) == 1:
            self.drives.append(None)
        self.features = self.count = self.lba_low = self.lba_mid = self.lba_high = 0
        self.hob_count = self.hob_lba_low = self.hob_lba_mid = self.hob_lba_high = 0
        self.device = 0
        self.control = 0
        self._signature()

    def reset(self) -> None:
        """Power-on (hardware) reset, ATA/ATAPI-6: every device to its power-on state, Device Control 00h, the
        signature in the task file registers, no interrupt pending."""
        for drive in self.drives:
            if drive is not None:
                drive.power_on()
        self.features = self.hob_count = self.hob_lba_low = self.hob_lba_mid = self.hob_lba_high = 0
        self.control = 0
        self._signature()
        self._update_irq()

    def save(self) -> dict[str, Any]:
        """The registers and both devices (null for an absent one)."""
        state: dict[str, Any] = {name: getattr(self, name) for name in self._REGISTERS}
        state["drives"] = [None if drive is None else drive.save() for drive in self.drives]
        return state

    def restore(self, state: Mapping[str, Any], version: int) -> None:
        """Take a state :meth:`save` returned; check every field, and that the same devices are attached, first."""
        f = StateFields(f"{self.state_kind}@{self.io_base:#x}", state)
        registers = {name: f.integer(name, 0, 0xFF) for name in self._REGISTERS}
        appliers = []
        for index, (saved, drive) in enumerate(zip(f.sections("drives", length=2), self.drives, strict=True)):
            if (saved is None) != (drive is None):
                present = "absent" if saved is None else "present"
                raise f.error(f"drives[{index}]", f"device {index} was {present} when saved, but is not so here")
            if saved is not None and drive is not None:
                appliers.append(drive.check(saved))
        for name, value in registers.items():
            setattr(self, name, value)
        for apply in appliers:
            apply()
        self._update_irq()

    # -- registers -------------------------------------------------------

    @property
    def selected(self) -> int:
        return 1 if self.device & DEV else 0

    def _drive(self) -> _Drive | None:
        return self.drives[self.selected]

    def _update_irq(self) -> None:
        drive = self._drive()
        self.irq.set(drive is not None and drive.interrupt and not self.control & NIEN)

    def _status(self) -> int:
        drive = self._drive()
        if drive is None:
            return 0  # device 0 answers for an absent device 1
        return BSY if self.control & SRST else drive.status

    def _signature(self) -> None:
        # ATA/ATAPI-6, signature and persistence: after a reset or diagnostic an ATA device's Sector Count,
        # LBA Low/Mid/High and Device registers hold 01h, 01h, 00h, 00h, 00h.
        self.count, self.lba_low, self.lba_mid, self.lba_high, self.device = 1, 1, 0, 0, 0

    @on_port(0, 8)
    def command_block(self, access: PortAccess) -> int | None:
        """The command block registers; the data port at offset 0 takes 16- and 32-bit accesses."""
        if access.offset == 0 and access.size > 1:
            if access.is_write:
                self._write_data(access.value.to_bytes(access.size, "little"))
                return None
            return int.from_bytes(self._read_data(access.size), "little")
        # An 8-bit register file: a wide access is a run of byte accesses.
        result = 0
        for i in range(access.size):
            offset = access.offset + i
            if access.is_write:
                self._write_register(offset, access.value >> 8 * i & 0xFF)
            else:
                result |= self._read_register(offset) << 8 * i
        self._update_irq()
        return None if access.is_write else result

    def _read_register(self, offset: int) -> int:
        hob = bool(self.control & HOB)
        if offset == 0:
            return 0xFF
        if offset == 1:
            drive = self._drive()
            return drive.error if drive is not None else 0
        if offset == 2:
            return self.hob_count if hob else self.count
        if offset == 3:
            return self.hob_lba_low if hob else self.lba_low
        if offset == 4:
            return self.hob_lba_mid if hob else self.lba_mid
        if offset == 5:
            return self.hob_lba_high if hob else self.lba_high
        if offset == 6:
            return self.device
        drive = self._drive()
        if drive is not None:
            drive.interrupt = False
        return self._status()

    def _write_register(self, offset: int, value: int) -> None:
        # ATA/ATAPI-6, Device Control register: a write to any command block register clears HOB.
        self.control &= ~HOB
        if offset == 1:
            self.features = value
        elif offset == 2:
            self.hob_count, self.count = self.count, value
        elif offset == 3:
            self.hob_lba_low, self.lba_low = self.lba_low, value
        elif offset == 4:
            self.hob_lba_mid, self.lba_mid = self.lba_mid, value
        elif offset == 5:
            self.hob_lba_high, self.lba_high = self.lba_high, value
        elif offset == 6:
            self.device = value
        elif offset == 7:
            self._command(value)

    @on_port(0x206, max_size=1)
    def control_block(self, access: PortAccess) -> int | None:
        """Alternate Status (no side effects) on read, Device Control on write."""
        if not access.is_write:
            return self._status()
        old, self.control = self.control, access.value
        if access.value & SRST and not old & SRST:
            for drive in self.drives:
                if drive is not None:
                    drive.transfer = None
                    drive.interrupt = False
        elif old & SRST and not access.value & SRST:
            # ATA/ATAPI-6, software reset protocol: the reset ends with the diagnostic code in Error and the signature.
            for drive in self.drives:
                if drive is not None:
                    drive.status, drive.error = READY, 0x01
            self._signature()
        self._update_irq()
        return None

    # -- data port -------------------------------------------------------

    @on_bulk(0)
    def data_bulk(self, access: BulkAccess) -> bytes | None:
        """String I/O on the data port: the same byte stream as element-wise access, a chunk at a time."""
        if access.size == 1:
            return None if access.is_write else b"\xff" * access.elements
        if access.is_write:
            self._write_data(access.data)
            return None
        return self._read_data(access.size * access.elements)

    def _read_data(self, size: int) -> bytes:
        drive = self._drive()
        transfer = drive.transfer if drive is not None else None
        if drive is None or transfer is None or transfer.write:
            return bytes(size)  # indeterminate per the standard; QEMU returns 0
        out = bytearray()
        while transfer is drive.transfer and len(out) < size:
            end = min(transfer.position + size - len(out), len(transfer.buffer))
            out += transfer.buffer[transfer.position : end]
            transfer.position = end
            if end == len(transfer.buffer):
                self._block_done(drive, transfer)
        return bytes(out.ljust(size, b"\0"))

    def _write_data(self, data: bytes) -> None:
        drive = self._drive()
        transfer = drive.transfer if drive is not None else None
        if drive is None or transfer is None or not transfer.write:
            return
        view = memoryview(data)
        while transfer is drive.transfer and view:
            take = min(len(view), len(transfer.buffer) - transfer.position)
            transfer.buffer[transfer.position : transfer.position + take] = view[:take]
            transfer.position += take
            view = view[take:]
            if transfer.position == len(transfer.buffer):
                drive.disk.write(transfer.lba, transfer.buffer)
                self._block_done(drive, transfer)
        self._update_irq()

    def _block_done(self, drive: _Drive, transfer: _Transfer) -> None:
        sectors = len(transfer.buffer) // SECTOR_SIZE
        transfer.lba += sectors
        transfer.remaining -= sectors
        if transfer.remaining:
            self._load_block(drive, transfer)
            drive.interrupt = True
        else:
            drive.transfer = None
            drive.status = READY
            # Data-out commands interrupt when the last block is written; data-in ones do not.
            drive.interrupt = transfer.write
        self._update_irq()

    def _load_block(self, drive: _Drive, transfer: _Transfer) -> None:
        sectors = min(transfer.block, transfer.remaining)
        if transfer.write:
            transfer.buffer = bytearray(sectors * SECTOR_SIZE)
        else:
            transfer.buffer = bytearray(drive.disk.read(transfer.lba, sectors))
        transfer.position = 0
        drive.status = READY | DRQ

    # -- commands --------------------------------------------------------

    def _command(self, command: int) -> None:
        if command == 0x90:
            self._diagnostic()
            return
        drive = self._drive()
        if drive is None or self.control & SRST or drive.status & (BSY | DRQ):
            # Absent device, or busy: the standard leaves the result indeterminate; QEMU ignores it.
            return
        drive.interrupt = False
        drive.error = 0
        if command in _READ_COMMANDS or command in _WRITE_COMMANDS:
            self._data_command(drive, command)
        elif command == 0xEC:
            self._start(drive, _Transfer(False, 0, 1, 1, bytearray(self._identify(drive))), interrupt=True)
        elif command in (0x40, 0x41, 0x42):
            address = self._address(drive, command == 0x42)
            if address is not None:
                self._complete(drive)
        elif 0x10 <= command <= 0x1F or command in (0xE0, 0xE1, 0xE2, 0xE3):
            self._complete(drive)  # recalibrate, standby/idle (immediate): nothing to move
        elif 0x70 <= command <= 0x7F:
            if self._locate(drive, False, 1) is not None:
                self._complete(drive)
        elif command == 0x91:
            self._initialize_parameters(drive)
        elif command == 0xC6:
            self._set_multiple(drive)
        elif command == 0xEF:
            self._set_features(drive)
        elif command in (0xE7, 0xEA):
            drive.disk.flush()
            self._complete(drive)
        elif command == 0xE5:
            self.count = 0xFF  # active or idle
            self._complete(drive)
        elif command in (0xF8, 0x27):
            self._native_max(drive, command == 0x27)
        else:
            self._abort(drive)

    def _complete(self, drive: _Drive) -> None:
        drive.status = READY
        drive.interrupt = True

    def _abort(self, drive: _Drive, error: int = ABRT) -> None:
        drive.status = DRDY | ERR
        drive.error = error
        drive.interrupt = True

    def _start(self, drive: _Drive, transfer: _Transfer, *, interrupt: bool) -> None:
        drive.transfer = transfer
        drive.status = READY | DRQ
        drive.interrupt = interrupt

    def _diagnostic(self) -> None:
        # ATA/ATAPI-6, EXECUTE DEVICE DIAGNOSTIC: every device runs it; device 0 reports 01h (device 1
        # passed or absent) and interrupts.
        for drive in self.drives:
            if drive is not None:
                drive.transfer = None
                drive.status, drive.error, drive.interrupt = READY, 0x01, drive.number == 0
        self._signature()

    def _sector_count(self, ext: bool) -> int:
        if ext:
            return (self.hob_count << 8 | self.count) or 0x10000
        return self.count or 0x100

    def _address(self, drive: _Drive, ext: bool) -> int | None:
        """The starting LBA of a media command, or None (command aborted) if it is not on the disk."""
        return self._locate(drive, ext, self._sector_count(ext))

    def _locate(self, drive: _Drive, ext: bool, count: int) -> int | None:
        if ext:
            lba = (self.hob_lba_high << 40 | self.hob_lba_mid << 32 | self.hob_lba_low << 24
                   | self.lba_high << 16 | self.lba_mid << 8 | self.lba_low)  # fmt: skip
        elif self.device & LBA:
            lba = (self.device & 0x0F) << 24 | self.lba_high << 16 | self.lba_mid << 8 | self.lba_low
        else:
            cylinders, heads, per_track = drive.current
            cylinder, head, sector = self.lba_high << 8 | self.lba_mid, self.device & 0x0F, self.lba_low
            if cylinder >= cylinders or head >= heads or not 1 <= sector <= per_track:
                self._abort(drive, IDNF)
                return None
            lba = (cylinder * heads + head) * per_track + sector - 1
        if lba + count > drive.disk.sectors:
            self._abort(drive, IDNF)
            return None
        return lba

    def _data_command(self, drive: _Drive, command: int) -> None:
        write = command in _WRITE_COMMANDS
        ext, multiple = (_WRITE_COMMANDS if write else _READ_COMMANDS)[command]
        if multiple and not drive.multiple:
            self._abort(drive)
            return
        if write and drive.disk.read_only:
            self._abort(drive)
            return
        lba = self._address(drive, ext)
        if lba is None:
            return
        transfer = _Transfer(write, lba, self._sector_count(ext), drive.multiple if multiple else 1, bytearray())
        self._load_block(drive, transfer)
        # PIO data-in interrupts when each block is ready; data-out waits for the first block without one.
        self._start(drive, transfer, interrupt=not write)

    def _initialize_parameters(self, drive: _Drive) -> None:
        per_track, heads = self.count, (self.device & 0x0F) + 1
        cylinders = min(65535, drive.disk.sectors // (heads * per_track)) if per_track else 0
        if not cylinders:
            self._abort(drive)
            return
        drive.current = (cylinders, heads, per_track)
        self._complete(drive)

    def _set_multiple(self, drive: _Drive) -> None:
        count = self.count
        if count > MAX_MULTIPLE or count & (count - 1):
            self._abort(drive)
            return
        drive.multiple = count
        self._complete(drive)

    def _set_features(self, drive: _Drive) -> None:
        feature = self.features
        if feature in (0x02, 0x82):
            drive.write_cache = feature == 0x02
        elif feature in (0xAA, 0x55):
            drive.look_ahead = feature == 0xAA
        elif feature == 0x03:
            # Transfer mode: PIO default (00h, 01h) or PIO flow control modes 0-4 (08h-0Ch); no DMA here.
            if not (self.count in (0x00, 0x01) or 0x08 <= self.count <= 0x0C):
                self._abort(drive)
                return
        elif feature not in (0x66, 0xCC):
            self._abort(drive)
            return
        self._complete(drive)

    def _native_max(self, drive: _Drive, ext: bool) -> None:
        top = drive.disk.sectors - 1
        if ext:
            self.hob_lba_low, self.hob_lba_mid, self.hob_lba_high = top >> 24 & 0xFF, top >> 32 & 0xFF, top >> 40 & 0xFF
            self.lba_low, self.lba_mid, self.lba_high = top & 0xFF, top >> 8 & 0xFF, top >> 16 & 0xFF
        elif not self.device & LBA:
            self._abort(drive)
            return
        else:
            top = min(top, LBA28_LIMIT - 1)
            self.lba_low, self.lba_mid, self.lba_high = top & 0xFF, top >> 8 & 0xFF, top >> 16 & 0xFF
            self.device = self.device & 0xF0 | top >> 24 & 0x0F
        self._complete(drive)

    def _identify(self, drive: _Drive) -> bytes:
        """The 256 IDENTIFY DEVICE words (ATA/ATAPI-6, IDENTIFY DEVICE data)."""
        disk = drive.disk
        words = [0] * 256
        cylinders, heads, per_track = disk.geometry
        words[0] = 0x0040  # ATA device, not removable
        words[1], words[3], words[6] = cylinders, heads, per_track
        words[2] = 0xC837  # no SET FEATURES needed to spin up; this IDENTIFY response is complete
        words[10:20] = _ata_string(disk.serial, 10)
        words[23:27] = _ata_string(disk.firmware, 4)
        words[27:47] = _ata_string(disk.model, 20)
        words[47] = 0x8000 | MAX_MULTIPLE
        words[49] = 0x0A00  # IORDY supported, LBA supported (no DMA)
        words[50] = 0x4000
        words[51] = 0x0200  # obsolete PIO timing mode 2
        words[53] = 0x0007  # words 54-58, 64-70 and 88 are valid
        current_c, current_h, current_s = drive.current
        words[54], words[55], words[56] = current_c, current_h, current_s
        chs_capacity = current_c * current_h * current_s
        words[57], words[58] = chs_capacity & 0xFFFF, chs_capacity >> 16
        words[59] = 0x0100 | drive.multiple
        lba28 = min(disk.sectors, LBA28_LIMIT)
        words[60], words[61] = lba28 & 0xFFFF, lba28 >> 16
        words[64] = 0x0003  # PIO modes 3 and 4
        words[67] = words[68] = 120  # minimum PIO cycle times (ns) without and with IORDY
        words[80] = 0x0070  # ATA/ATAPI-4, -5 and -6
        words[82] = 0x4068  # NOP, read look-ahead, write cache, power management
        words[83] = 0x7400  # FLUSH CACHE EXT, FLUSH CACHE, 48-bit address
        words[84] = 0x4000
        words[85] = 0x4008 | (0x40 if drive.look_ahead else 0) | (0x20 if drive.write_cache else 0)
        words[86] = 0x3400
        words[87] = 0x4000
        words[93] = self._reset_result(drive)
        for i in range(4):
            words[100 + i] = disk.sectors >> 16 * i & 0xFFFF
        data = bytearray(b"".join(w.to_bytes(2, "little") for w in words))
        # Word 255: signature A5h and a checksum making the 512 bytes sum to 0 (mod 256).
        data[510] = 0xA5
        data[511] = -sum(data[:511]) & 0xFF
        return bytes(data)

    def _reset_result(self, drive: _Drive) -> int:
        # Word 93, hardware reset result: device number by jumper, diagnostics passed; device 0 either saw
        # device 1's PDIAG- and DASP- or answers for it.
        if drive.number == 1:
            return 0x4000 | 0x0800 | 0x0200 | 0x0100
        present = self.drives[1] is not None
        return 0x4000 | (0x0030 if present else 0x0040) | 0x0008 | 0x0002 | 0x0001
