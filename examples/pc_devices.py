"""A PC's I/O ports in one call: :func:`build_pc` wires the example devices as a PIIX-era board has them.

- 0x20-0x21, 0xA0-0xA1, 0x4D0-0x4D1: the i8259A pair and its ELCRs (``pic``), receiving IRQ lines 0-15
- 0x40-0x43: the i8254 PIT, channel 0 on IRQ 0 (``pit``); 0x61: system control port B (``port61``)
- 0x60, 0x64: the i8042 with keyboard and mouse, IRQ 1 and 12 (``i8042``)
- 0x70-0x71: the MC146818 RTC and CMOS, IRQ 8 (``rtc``), memory-size fields filled in
- 0x80: POST codes (``post``); 0x92: system control port A, fast A20 and reset (``port92``)
- 0x1F0-0x1F7, 0x3F6: ATA channel 0, IRQ 14, only with a disk (``ata``)
- 0x3F8-0x3FF: the 16550A UART as COM1, IRQ 4 (``uart``)
- 0x402 and 0xE9: the debug console (``debugcon``, ``debugcon_e9``)
- 0x501-0x502 (or 0xF4-0xF7): isa-debug-exit (``exit``)
- 0xCF8-0xCFF: PCI configuration mechanism #1 and the PIIX reset control register (``pci``)

Every other port stays unclaimed and reads all ones: fw_cfg, DMA
controllers, the secondary ATA channel, COM2-4 and the LPT ports, which is
what firmware probing for them expects to find when they are absent.

PCI shows an i440FX host bridge (00:00.0), a PIIX3 ISA bridge (00:01.0) and,
with a disk, a PIIX3 IDE function (00:01.1) in legacy mode, because SeaBIOS
scans the legacy ATA ports only for an IDE-class PCI function. Its
programming interface says "no bus master": there is no DMA here.

The devices have no threads. A machine loop calls :meth:`PC.poll` to bring
time-driven interrupts (PIT, RTC, UART) up to date, and may sleep until
:meth:`PC.next_due`; the CPU side asks ``pc.pic.pending_vector()`` and
acknowledges with ``pc.pic.acknowledge()``.

Every device implements the device state API (``docs/DEVICE_STATE.md``):
:meth:`PC.save_state` collects them into one document, :meth:`PC.restore_state`
puts it back (all devices or none), :meth:`PC.reset` is a power-on reset.
Guest RAM and the disk image are not device state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dispatcher import IrqLine, Router, reset_devices, restore_devices, save_devices

from .ata import AtaChannel, AtaDisk
from .debug import DebugConsole, DebugExit, PostCodes
from .i8042 import I8042
from .pci import PciFunction, PciHost
from .pic import PicPair
from .pit import Pit8254, SystemControlB
from .port92 import Port92
from .rtc import Rtc146818
from .uart import Uart16550

__all__ = ["PC", "build_pc"]

MiB = 1 << 20
# QEMU's pc machine keeps RAM below 3.5 GiB, or below 3 GiB once it does not fit there.
_LOWMEM, _LOWMEM_ALIGNED = 0xE000_0000, 0xC000_0000


def _discard(data: bytes) -> None:
    pass


@dataclass(eq=False)
class PC:
    """The devices of a PC and the router that serves their ports."""

    router: Router
    pic: PicPair
    pit: Pit8254
    port61: SystemControlB
    rtc: Rtc146818
    uart: Uart16550
    i8042: I8042
    port92: Port92
    pci: PciHost
    ata: AtaChannel | None
    debugcon: DebugConsole
    debugcon_e9: DebugConsole
    post: PostCodes
    exit: DebugExit
    on_reset: Callable[[], object] | None = None
    on_a20: Callable[[bool], object] | None = None
    reset_requests: int = 0
    irq_lines: tuple[IrqLine, ...] = ()
    """The devices' interrupt lines into the PICs (IRQ 0, 1, 4, 8, 12, 14), for a recorder or a test to tap."""
    _a20: bool = field(default=True, repr=False)

    @property
    def a20(self) -> bool:
        """Whether address line 20 is enabled: the i8042's gate OR port 0x92's, as on the board."""
        return self.i8042.a20 or self.port92.a20

    @property
    def exit_status(self) -> int | None:
        """The isa-debug-exit status once the guest has written it, else None."""
        return self.exit.status

    def poll(self) -> None:
        """Bring the time-driven interrupt lines up to date (PIT channel 0, RTC, UART timeouts)."""
        self.pit.update()
        self.rtc.update()
        self.uart.poll()

    def next_due(self) -> float | None:
        """The earliest time (by the devices' clock) at which :meth:`poll` has something to do, or None."""
        due = [t for t in (self.pit.next_due(), self.rtc.next_due(), self.uart.next_due()) if t is not None]
        return min(due) if due else None

    def save_state(self) -> dict[str, Any]:
        """Every device's state as one document (:func:`dispatcher.save_devices`)."""
        return save_devices(self.router)

    def restore_state(self, document: object, *, source: str = "state document") -> None:
        """Restore every device from a :meth:`save_state` document; on error nothing changed.

        ``on_a20`` hears the combined A20 state if it differs from before.

        :raises dispatcher.StateError: naming the device and the field.
        """
        restore_devices(self.router, document, source=source)
        self._a20_changed(self.a20)

    def reset(self) -> None:
        """Power-on reset of every device (each to its datasheet's state); ``on_a20`` hears A20 change."""
        reset_devices(self.router)
        self._a20_changed(self.a20)

    def _reset(self, *_: object) -> None:
        self.reset_requests += 1
        if self.on_reset is not None:
            self.on_reset()

    def _a20_changed(self, _: bool) -> None:
        if self.a20 != self._a20:
            self._a20 = self.a20
            if self.on_a20 is not None:
                self.on_a20(self._a20)


def _piix3_isa_bridge() -> PciFunction:
    return PciFunction(0x8086, 0x7000, class_code=0x060100)


def _piix3_ide_legacy() -> PciFunction:
    # Legacy mode on both channels (prog-if bits 0 and 2 clear), no bus master (bit 7 clear).
    return PciFunction(0x8086, 0x7010, class_code=0x010100)


def build_pc(
    *,
    memory_size: int = 128 * MiB,
    disk: AtaDisk | bytearray | str | os.PathLike[str] | None = None,
    serial_sink: Callable[[bytes], object] = _discard,
    serial_input: Callable[[], bytes] | None = None,
    debug_sink: Callable[[bytes], object] = _discard,
    clock: Callable[[], float] = time.monotonic,
    start_time: datetime | None = None,
    intr: IrqLine | None = None,
    exit_port: int = 0x501,
    on_exit: Callable[[int], object] | None = None,
    on_reset: Callable[[], object] | None = None,
    on_a20: Callable[[bool], object] | None = None,
) -> PC:
    """Assemble a PC's devices on a new router and return them.

    ``memory_size`` (bytes of RAM) fills the CMOS memory-size fields the
    firmware reads; ``disk`` (a disk, a bytearray or an image path) becomes
    ATA device 0 on the primary channel. The UART (COM1) sends to
    ``serial_sink`` and reads from ``serial_input``; the debug console
    (0x402 and 0xE9) writes to ``debug_sink``. ``clock`` (monotonic seconds)
    drives the PIT, RTC and UART; ``start_time`` is the RTC's initial time
    (host UTC by default). ``intr`` receives the PIC's INT output (a KVM
    injector, say). ``exit_port`` places isa-debug-exit (0x501, two ports, or
    0xF4, four ports: QEMU's usual settings); ``on_exit(status)`` hears its
    writes. ``on_reset()`` is called for every reset request (i8042 pulse,
    port 0x92, 0xCF9) and ``on_a20(enabled)`` when the combined A20 state
    changes.
    """
    if memory_size < MiB:
        raise ValueError(f"memory_size {memory_size:#x} is less than 1 MiB")
    pic = PicPair(irq=intr)

    lines: list[IrqLine] = []

    def line(number: int) -> IrqLine:
        lines.append(IrqLine(pic, number, f"IRQ{number}"))
        return lines[-1]

    pit = Pit8254(irq=line(0), clock=clock)
    rtc = Rtc146818(irq=line(8), clock=clock, start=start_time)
    below = memory_size if memory_size < _LOWMEM else _LOWMEM_ALIGNED
    rtc.set_memory_size(below, memory_size - below)
    if disk is not None and not isinstance(disk, AtaDisk):
        disk = AtaDisk(disk)
    pci = PciHost()
    pci.add(_piix3_isa_bridge(), 1, 0)
    if disk is not None:
        pci.add(_piix3_ide_legacy(), 1, 1)
    pc = PC(
        router=Router(),
        pic=pic,
        pit=pit,
        port61=SystemControlB(pit),
        rtc=rtc,
        uart=Uart16550(serial_sink, irq=line(4), source=serial_input, clock=clock),
        i8042=I8042(irq=line(1), aux_irq=line(12)),
        port92=Port92(),
        pci=pci,
        ata=AtaChannel(disk, irq=line(14)) if disk is not None else None,
        debugcon=DebugConsole(debug_sink, io_base=0x402),
        debugcon_e9=DebugConsole(debug_sink, io_base=0xE9),
        post=PostCodes(),
        exit=DebugExit(io_base=exit_port, size=4 if exit_port == 0xF4 else 2, on_exit=on_exit),
        on_reset=on_reset,
        on_a20=on_a20,
    )
    pc.irq_lines = tuple(lines)
    pc._a20 = pc.a20
    pc.i8042.on_reset = pc.port92.on_reset = pc._reset
    pci.on_reset = pc._reset
    pc.i8042.on_a20 = pc.port92.on_a20 = pc._a20_changed
    for device in (pic, pit, pc.port61, rtc, pc.uart, pc.i8042, pc.port92, pci, pc.ata, pc.debugcon, pc.debugcon_e9,
                   pc.post, pc.exit):  # fmt: skip
        if device is not None:
            pc.router.include(device)
    return pc
