"""PCI configuration mechanism #1 (ports 0xCF8-0xCFF) and PCI functions with their config space.

CONFIG_ADDRESS at 0xCF8 is a 32-bit register: bit 31 enables configuration
cycles, bits 23:16 select the bus, 15:11 the device, 10:8 the function and
7:2 the dword register; bits 30:24 and 1:0 are reserved and read 0 (PCI
Local Bus Specification 3.0, 3.2.2.3.2). Only a dword access reaches it: as
Intel chipset datasheets say, a byte or word access "passes through" to
the bus as an ordinary I/O cycle. Here such accesses read all ones and are
dropped, except byte 0xCF9, the PIIX reset control register (bit 2 rising
resets the system; bit 1 selects a hard reset).

CONFIG_DATA at 0xCFC-0xCFF reaches the selected dword at every width and
offset inside it (0xCFE with a word access is bytes 2-3). Without the
enable bit, or for a function nobody added, reads return all ones and
writes are dropped, as a master abort does on a real bus.

A :class:`PciFunction` holds 256 bytes of configuration space, a write mask
and a write-one-to-clear mask, so a read-only field stays read-only at any
access width. Base address registers follow the sizing protocol: software
writes all ones and reads back the size mask with the type bits (I/O or
memory, 32- or 64-bit, prefetchable).

Device state (kind ``pci-host``, version 1): CONFIG_ADDRESS, the reset
control register, and each function's 256 bytes of configuration space by
bus:device.function. A restore checks that the same functions are present
and that their read-only bytes (IDs, class, BAR types) are what was saved.
A subclass with state of its own beyond its configuration space extends
:meth:`PciFunction.save` and :meth:`PciFunction.check`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dispatcher import PortAccess, StateFields, on_port

__all__ = ["Bar", "PciFunction", "PciHost", "i440fx_host_bridge"]

ENABLE = 0x8000_0000
ADDRESS_MASK = 0x80FF_FFFC  # reserved bits 30:24 and 1:0 read 0

# Header offsets
VENDOR_ID, DEVICE_ID, COMMAND, STATUS, REVISION, CLASS = 0x00, 0x02, 0x04, 0x06, 0x08, 0x09
CACHE_LINE, LATENCY, HEADER_TYPE, BAR0, SUBSYSTEM_VENDOR, SUBSYSTEM, ROM = 0x0C, 0x0D, 0x0E, 0x10, 0x2C, 0x2E, 0x30
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
MULTI_FUNCTION = 0x80

# I/O space, memory space, bus master, parity error response, SERR# enable, interrupt disable.
COMMAND_WRITABLE = 0x0547
# Status error bits are write-one-to-clear: master data parity, signalled/received target and master
# abort, signalled system error, detected parity error.
STATUS_W1C = 0xF900

RESET_CPU, HARD_RESET = 0x04, 0x02


@dataclass(frozen=True, slots=True)
class Bar:
    """A base address register's shape: ``size`` bytes of I/O or memory space."""

    index: int
    size: int
    io: bool = False
    wide: bool = False
    prefetchable: bool = False

    @property
    def flags(self) -> int:
        """The read-only low bits: bit 0 I/O space; for memory, bits 2:1 type (10b: 64-bit) and bit 3 prefetchable."""
        if self.io:
            return 0x1
        return (0x4 if self.wide else 0) | (0x8 if self.prefetchable else 0)


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class PciFunction:
    """One function's type 0 configuration space, as software reads and writes it.

    ``class_code`` is the 24-bit base class, subclass and programming
    interface (0x060000 is a host bridge). The device-specific area
    0x40-0xFF is writable unless :meth:`set` says otherwise (as in QEMU).
    Subclasses may override :meth:`read` and :meth:`write` for registers
    with side effects; :meth:`written` is called after every guest write.
    """

    def __init__(
        self,
        vendor_id: int,
        device_id: int,
        *,
        class_code: int = 0,
        revision: int = 0,
        header_type: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 0,
        command: int = 0,
        status: int = 0,
    ) -> None:
        self.config = bytearray(256)
        self.power_on = bytearray(256)  # config as the device side set it up: what a reset returns to
        self.wmask = bytearray(256)
        self.w1cmask = bytearray(256)
        self.bars: dict[int, Bar] = {}
        self.rom_size = 0
        self.set(VENDOR_ID, 2, vendor_id)
        self.set(DEVICE_ID, 2, device_id)
        self.set(COMMAND, 2, command, wmask=COMMAND_WRITABLE)
        self.set(STATUS, 2, status, w1cmask=STATUS_W1C)
        self.set(REVISION, 1, revision)
        self.set(CLASS, 3, class_code)
        self.set(CACHE_LINE, 1, 0, wmask=0xFF)
        self.set(LATENCY, 1, 0, wmask=0xFF)
        self.set(HEADER_TYPE, 1, header_type)
        self.set(SUBSYSTEM_VENDOR, 2, subsystem_vendor_id)
        self.set(SUBSYSTEM, 2, subsystem_id)
        self.set(INTERRUPT_LINE, 1, 0, wmask=0xFF)
        self.set(INTERRUPT_PIN, 1, interrupt_pin)
        self.wmask[0x40:] = b"\xff" * 0xC0

    @property
    def vendor_id(self) -> int:
        return int.from_bytes(self.config[0:2], "little")

    @property
    def device_id(self) -> int:
        return int.from_bytes(self.config[2:4], "little")

    @property
    def command(self) -> int:
        return int.from_bytes(self.config[4:6], "little")

    def set(self, offset: int, size: int, value: int, *, wmask: int = 0, w1cmask: int = 0) -> None:
        """Set ``size`` bytes at ``offset`` from the device side, with the bits the guest may write or clear."""
        if not 0 <= offset <= offset + size <= 256:
            raise ValueError(f"config bytes {offset:#x}+{size} are outside the 256-byte space")
        end = offset + size
        self.config[offset:end] = (value & (1 << 8 * size) - 1).to_bytes(size, "little")
        self.power_on[offset:end] = self.config[offset:end]
        self.wmask[offset:end] = wmask.to_bytes(size, "little")
        self.w1cmask[offset:end] = w1cmask.to_bytes(size, "little")

    def add_bar(
        self, index: int, size: int, *, io: bool = False, wide: bool = False, prefetchable: bool = False
    ) -> Bar:
        """Declare BAR ``index`` (0-5) decoding ``size`` bytes; a 64-bit (``wide``) BAR also takes ``index + 1``."""
        bar = Bar(index, size, io, wide, prefetchable)
        slots = (index, index + 1) if wide else (index,)
        if not 0 <= index <= (4 if wide else 5):
            raise ValueError(f"BAR {index} does not exist{' for a 64-bit BAR' if wide else ''}")
        if any(slot in self.bars or (slot - 1 in self.bars and self.bars[slot - 1].wide) for slot in slots):
            raise ValueError(f"BAR {index} is already in use")
        if io and (wide or prefetchable):
            raise ValueError("an I/O BAR is neither 64-bit nor prefetchable")
        # PCI 3.0, 6.2.5.1: an I/O BAR decodes at most 256 bytes.
        limit = 1 << 63 if wide else 0x100 if io else 1 << 31
        if not _power_of_two(size) or not (4 if io else 16) <= size <= limit:
            raise ValueError(f"BAR size {size:#x} must be a power of two from {4 if io else 16} to {limit:#x}")
        self.bars[index] = bar
        mask = ~(size - 1) & ~(0x3 if io else 0xF)
        offset = BAR0 + 4 * index
        self.set(offset, 4, bar.flags, wmask=mask & 0xFFFF_FFFF)
        if wide:
            self.set(offset + 4, 4, 0, wmask=mask >> 32 & 0xFFFF_FFFF)
        return bar

    def add_rom(self, size: int) -> None:
        """Declare an expansion ROM BAR (offset 0x30) of ``size`` bytes; bit 0 is its enable bit."""
        if not _power_of_two(size) or not 0x800 <= size <= 1 << 24:
            raise ValueError(f"ROM size {size:#x} must be a power of two from 2 KiB to 16 MiB")
        self.rom_size = size
        self.set(ROM, 4, 0, wmask=~(size - 1) & 0xFFFF_F800 | 1)

    def bar_address(self, index: int) -> int:
        """The base address software has programmed into BAR ``index`` (type bits removed)."""
        bar = self.bars[index]
        offset = BAR0 + 4 * index
        value = int.from_bytes(self.config[offset : offset + (8 if bar.wide else 4)], "little")
        return value & ~(0x3 if bar.io else 0xF)

    def reset(self) -> None:
        """Power-on (RST#): configuration space as the device side set it up, every BAR and the command register
        as :meth:`set` left them."""
        self.config[:] = self.power_on

    def save(self) -> dict[str, Any]:
        """The configuration space, as a hex string."""
        return {"config": self.config.hex()}

    def check(self, f: StateFields) -> Callable[[], None]:
        """Check a saved function against this one (read-only bytes must match); return what restores it."""
        config = f.data("config", length=256)
        for i in range(256):
            differs = (config[i] ^ self.config[i]) & ~(self.wmask[i] | self.w1cmask[i]) & 0xFF
            if differs:
                raise f.error(
                    "config", f"byte {i:#04x} is {config[i]:#04x}; its read-only bits are {self.config[i]:#04x} here"
                )

        def apply() -> None:
            self.config[:] = config

        return apply

    def read(self, offset: int, size: int) -> int:
        """A guest read of ``size`` bytes at ``offset`` (inside one dword)."""
        return int.from_bytes(self.config[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write: only bits in the write mask change; write-one-to-clear bits clear."""
        config, wmask, w1c = self.config, self.wmask, self.w1cmask
        for i in range(offset, offset + size):
            byte = value & 0xFF
            value >>= 8
            config[i] = (config[i] & ~wmask[i] | byte & wmask[i]) & ~(byte & w1c[i])
        self.written(offset, size)

    def written(self, offset: int, size: int) -> None:
        """Called after each guest write; override to act on a register (a BAR moved, a command bit set)."""


def i440fx_host_bridge() -> PciFunction:
    """The Intel 82441FX (440FX PMC) host bridge as QEMU's ``pc`` machine shows it: 8086:1237 rev 02, class 0600."""
    # Intel 82441FX datasheet: PCICMD resets to 0006h (memory space, bus master), PCISTS to 0280h (fast
    # back-to-back capable, medium DEVSEL timing).
    return PciFunction(0x8086, 0x1237, class_code=0x060000, revision=0x02, command=0x0006, status=0x0280)


def _bdf(bus: int, device: int, number: int) -> str:
    return f"{bus:02x}:{device:02x}.{number}"


class PciHost:
    """The configuration mechanism #1 ports and the functions behind them.

    A host bridge sits at 00:00.0: ``host_bridge``, or by default
    :func:`i440fx_host_bridge`. ``on_reset(hard)`` is called when the guest
    resets the system through 0xCF9.
    """

    state_kind = "pci-host"
    state_version = 1
    oldest_state_version = 1

    def __init__(
        self,
        *,
        io_base: int = 0xCF8,
        host_bridge: PciFunction | None = None,
        on_reset: Callable[[bool], object] | None = None,
    ) -> None:
        self.io_base = io_base
        self.address = 0
        self.reset_control = 0
        self.resets = 0
        self.on_reset = on_reset
        self.functions: dict[tuple[int, int, int], PciFunction] = {}
        self.add(host_bridge if host_bridge is not None else i440fx_host_bridge(), 0)

    def add(self, function: PciFunction, device: int, number: int = 0, *, bus: int = 0) -> PciFunction:
        """Place ``function`` at ``bus:device.number``; return it.

        Function 0 of a device with other functions gets the multi-function
        bit in its header type, without which software scans no further.
        """
        if not (0 <= bus <= 255 and 0 <= device <= 31 and 0 <= number <= 7):
            raise ValueError(f"{bus:02x}:{device:02x}.{number} is not a PCI address (bus 0-255, device 0-31, fn 0-7)")
        key = (bus, device, number)
        if key in self.functions:
            raise ValueError(f"{bus:02x}:{device:02x}.{number} is already occupied")
        self.functions[key] = function
        first = self.functions.get((bus, device, 0))
        if first is not None and any(k[:2] == (bus, device) and k[2] for k in self.functions):
            first.config[HEADER_TYPE] |= MULTI_FUNCTION
            first.power_on[HEADER_TYPE] |= MULTI_FUNCTION
        return function

    def reset(self) -> None:
        """Power-on: CONFIG_ADDRESS 0, the reset control register 00h, every function's power-on config space."""
        self.address = 0
        self.reset_control = 0
        for function in self.functions.values():
            function.reset()

    def save(self) -> dict[str, Any]:
        """CONFIG_ADDRESS, the reset control register and every function, by "bus:device.function"."""
        return {
            "address": self.address,
            "reset_control": self.reset_control,
            "functions": {_bdf(*key): function.save() for key, function in sorted(self.functions.items())},
        }

    def restore(self, state: Mapping[str, Any], version: int) -> None:
        """Take a state :meth:`save` returned; check the address, and every function against this host's, first."""
        f = StateFields(f"{self.state_kind}@{self.io_base:#x}", state)
        address = f.integer("address", 0, 0xFFFF_FFFF)
        if address & ~ADDRESS_MASK:
            raise f.error("address", f"is {address:#x}: bits 30:24 and 1:0 are reserved and read 0")
        reset_control = f.integer("reset_control", 0, HARD_RESET)
        if reset_control & ~HARD_RESET:
            raise f.error("reset_control", f"is {reset_control:#x}: only bit 1 is kept")
        functions = f.section("functions")
        here = {_bdf(*key): function for key, function in self.functions.items()}
        for name in functions.state:
            if name not in here:
                raise functions.error(
                    name, f"was saved, but this host has no function there ({', '.join(sorted(here))})"
                )
        appliers = [function.check(functions.section(name)) for name, function in sorted(here.items())]
        self.address, self.reset_control = address, reset_control
        for apply in appliers:
            apply()

    def function(self, bus: int, device: int, number: int) -> PciFunction | None:
        return self.functions.get((bus, device, number))

    def _selected(self) -> tuple[PciFunction | None, int]:
        address = self.address
        if not address & ENABLE:
            return None, 0
        key = (address >> 16 & 0xFF, address >> 11 & 0x1F, address >> 8 & 0x7)
        return self.functions.get(key), address & 0xFC

    @on_port(0, 4)
    def address_port(self, access: PortAccess) -> int | None:
        """0xCF8-0xCFB: CONFIG_ADDRESS for dword accesses at 0xCF8; byte 0xCF9 is the reset control register."""
        if access.size == 4 and access.offset == 0:
            if access.is_write:
                self.address = access.value & ADDRESS_MASK
                return None
            return self.address
        # Anything else passes through as an ordinary I/O cycle; only 0xCF9 answers it.
        rcr = 1 - access.offset
        if not 0 <= rcr < access.size:
            return None if access.is_write else (1 << 8 * access.size) - 1
        if access.is_write:
            self._write_reset_control(access.value >> 8 * rcr & 0xFF)
            return None
        others = (1 << 8 * access.size) - 1 & ~(0xFF << 8 * rcr)
        return others | self.reset_control << 8 * rcr

    def _write_reset_control(self, value: int) -> None:
        # PIIX reset control register: bit 2 set resets; it reads back 0, so every such write is a new
        # rising edge. Only bit 1 (reset type) is kept.
        if value & RESET_CPU:
            self.resets += 1
            if self.on_reset is not None:
                self.on_reset(bool(value & HARD_RESET))
        self.reset_control = value & HARD_RESET

    @on_port(4, 4)
    def data_port(self, access: PortAccess) -> int | None:
        """0xCFC-0xCFF: CONFIG_DATA, the selected register at every width and offset."""
        function, register = self._selected()
        if function is None:
            return None if access.is_write else (1 << 8 * access.size) - 1
        if access.is_write:
            function.write(register + access.offset, access.size, access.value)
            return None
        return function.read(register + access.offset, access.size)

    def read_config(self, bus: int, device: int, number: int, offset: int, size: int = 4) -> int:
        """Read config space from the host side, as the guest would see it (all ones if absent)."""
        function = self.functions.get((bus, device, number))
        return (1 << 8 * size) - 1 if function is None else function.read(offset, size)
