"""Each example device set up as a small machine for the device state tests and the golden state files.

A :class:`Scenario` builds a :class:`Machine` (a router with the device, a hand-moved clock, an IRQ
recorder and the bytes its sinks sent) and names the ports the guest may touch and the host-side actions
(bytes arriving on a line, a key press, an interrupt acknowledge). Operations are plain tuples, so the
same ones drive hypothesis and the fixed sequences that make the golden files:

- ``("out", port, size, value)`` and ``("in", port, size)``: a guest access;
- ``("tick", k)``: the clock moves ``k / 1024`` seconds (a binary fraction, so that re-based times are
  exact and two machines started at different times stay comparable);
- ``("host", name, param)``: a host action.

``make_golden.py`` in this folder writes ``golden/<kind>.json`` from :data:`GOLDEN`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dispatcher import IrqRecorder, PortAccess, Router
from examples.ata import AtaChannel, AtaDisk
from examples.debug import DebugConsole, DebugExit, PostCodes
from examples.i8042 import I8042
from examples.pc_devices import build_pc
from examples.pci import PciFunction, PciHost
from examples.pic import PicPair
from examples.pit import Pit8254, SystemControlB
from examples.port92 import Port92
from examples.rtc import Rtc146818
from examples.uart import Uart16550

Op = tuple[Any, ...]
START = datetime(2024, 2, 28, 23, 59, 50)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(eq=False)
class Machine:
    """A router with devices, and what the host side sees of them."""

    clock: Clock
    irqs: IrqRecorder = field(default_factory=IrqRecorder)
    router: Router = field(default_factory=Router)
    output: bytearray = field(default_factory=bytearray)
    media: list[bytearray] = field(default_factory=list)  # disk images: not device state
    parts: dict[str, Any] = field(default_factory=dict)


def access(router: Router, port: int, size: int, is_write: bool, value: int = 0) -> int | None:
    """One guest access as the dispatcher makes it: split into bytes past the claim's width; all ones unclaimed."""
    claim = router.lookup(port, write=is_write)
    if claim is None:
        return None if is_write else (1 << 8 * size) - 1
    if size > claim.max_size:
        result = 0
        for i in range(size):
            part = access(router, port + i, 1, is_write, value >> 8 * i & 0xFF)
            result |= (part or 0) << 8 * i
        return None if is_write else result
    mask = (1 << 8 * size) - 1
    answer = claim.handler(PortAccess(port, size, is_write, value & mask, port - claim.first, 0, 0))
    assert not hasattr(answer, "__await__")
    return None if is_write else int(answer or 0) & mask


Seen = tuple[object, tuple[bool, ...], bytes]


def run(machine: Machine, scenario: Scenario, ops: Sequence[Op]) -> list[Seen]:
    """Apply ``ops``; return what the host observed after each: values read, IRQ levels, output so far."""
    seen: list[Seen] = []
    for op in ops:
        result: object = None
        if op[0] == "out":
            access(machine.router, op[1], op[2], True, op[3])
        elif op[0] == "in":
            result = access(machine.router, op[1], op[2], False)
        elif op[0] == "tick":
            machine.clock.now += op[1] / 1024
        else:
            result = scenario.host[op[1]](machine, op[2])
        seen.append((result, tuple(machine.irqs.level(line) for line in scenario.lines), bytes(machine.output)))
    return seen


@dataclass(frozen=True)
class Scenario:
    """An example device (or set) as the tests drive it."""

    kind: str
    build: Callable[[float], Machine]
    ports: tuple[tuple[int, tuple[int, ...]], ...]  # port and the access sizes tried on it
    lines: tuple[int, ...] = ()
    host: dict[str, Callable[[Machine, int], object]] = field(default_factory=dict)
    values: dict[int, tuple[int, ...]] = field(default_factory=dict)  # values worth writing to a port


def _ports(first: int, count: int, sizes: tuple[int, ...] = (1,)) -> tuple[tuple[int, tuple[int, ...]], ...]:
    return tuple((port, sizes) for port in range(first, first + count))


# -- builders -------------------------------------------------------------------------------------------


def _uart(now: float) -> Machine:
    m = Machine(Clock(now))
    m.parts["uart"] = uart = Uart16550(m.output.extend, irq=m.irqs.line(4), clock=m.clock)
    m.router.include(uart)
    return m


def _pit(now: float) -> Machine:
    m = Machine(Clock(now))
    m.parts["pit"] = pit = Pit8254(irq=m.irqs.line(0), clock=m.clock)
    m.router.include(pit)
    m.router.include(SystemControlB(pit))
    return m


def _rtc(now: float) -> Machine:
    m = Machine(Clock(now))
    m.parts["rtc"] = rtc = Rtc146818(irq=m.irqs.line(8), clock=m.clock, start=START)
    m.router.include(rtc)
    return m


def _pic(now: float) -> Machine:
    m = Machine(Clock(now))
    m.parts["pic"] = pic = PicPair(irq=m.irqs.line(0, "INTR"))
    m.router.include(pic)
    return m


def _i8042(now: float) -> Machine:
    m = Machine(Clock(now))
    m.parts["kbc"] = kbc = I8042(irq=m.irqs.line(1), aux_irq=m.irqs.line(12))
    m.router.include(kbc)
    return m


def _disk(sectors: int, seed: int) -> bytearray:
    return bytearray((i * 7 + seed) & 0xFF for i in range(sectors * 512))


def _ata(now: float) -> Machine:
    m = Machine(Clock(now))
    m.media = [_disk(64, 1), _disk(32, 2)]
    ata = AtaChannel([AtaDisk(m.media[0]), AtaDisk(m.media[1])], irq=m.irqs.line(14))
    m.router.include(ata)
    return m


def _pci(now: float) -> Machine:
    m = Machine(Clock(now))
    host = PciHost()
    nic = PciFunction(0x1234, 0x1111, class_code=0x020000, interrupt_pin=1)
    nic.add_bar(0, 0x100, io=True)
    nic.add_bar(1, 0x1000)
    nic.add_bar(2, 0x4000, wide=True, prefetchable=True)
    nic.add_rom(0x800)
    host.add(nic, 3)
    host.add(PciFunction(0x1234, 0x2222, class_code=0x078000), 3, 1)
    m.router.include(host)
    return m


def _port92(now: float) -> Machine:
    m = Machine(Clock(now))
    m.router.include(Port92())
    return m


def _port61(now: float) -> Machine:
    # Port 0x61 alone on the router (its PIT is not served here), so its document holds just it.
    m = Machine(Clock(now))
    m.router.include(SystemControlB(Pit8254(clock=m.clock)))
    return m


def _debug(now: float) -> Machine:
    m = Machine(Clock(now))
    for device in (DebugConsole(m.output.extend, io_base=0x402), PostCodes(), DebugExit()):
        m.router.include(device)
    return m


def _pc(now: float) -> Machine:
    m = Machine(Clock(now))
    m.media = [_disk(64, 3)]
    pc = build_pc(
        memory_size=64 << 20,
        disk=m.media[0],
        serial_sink=m.output.extend,
        debug_sink=m.output.extend,
        clock=m.clock,
        start_time=START,
        intr=m.irqs.line(0, "INTR"),
    )
    m.parts["pc"] = pc
    m.router = pc.router
    return m


def _uart_part(m: Machine) -> Uart16550:
    uart = m.parts["uart"] if "uart" in m.parts else m.parts["pc"].uart
    assert isinstance(uart, Uart16550)
    return uart


def _receive(m: Machine, p: int) -> None:
    _uart_part(m).receive(bytes([p & 0xFF]) * (1 + (p >> 8 & 7)))


def _receive_error(m: Machine, p: int) -> None:
    _uart_part(m).receive_error(p & 0xFF, parity=bool(p & 0x100), framing=bool(p & 0x200))


def _modem(m: Machine, p: int) -> None:
    _uart_part(m).set_modem_inputs(cts=bool(p & 1), dsr=bool(p & 2), ri=bool(p & 4), dcd=bool(p & 8))


ATA_COMMANDS = (0x20, 0x21, 0x24, 0x29, 0x30, 0x34, 0x39, 0xC4, 0xC5, 0xC6, 0x40, 0x42, 0x70, 0x90, 0x91, 0xE5,
                0xE7, 0xEA, 0xEC, 0xEF, 0xF8, 0x27, 0xA1, 0x08)  # fmt: skip
PCI_ADDRESSES = tuple(
    0x8000_0000 | device << 11 | number << 8 | register << 2
    for device, number in ((0, 0), (3, 0), (3, 1), (5, 0))
    for register in (0, 1, 3, 4, 5, 6, 7, 8, 12, 15, 16, 40)
)

SCENARIOS: dict[str, Scenario] = {
    "uart16550": Scenario(
        "uart16550",
        _uart,
        _ports(0x3F8, 8),
        lines=(4,),
        host={
            "receive": _receive,
            "receive_error": _receive_error,
            "receive_break": lambda m, p: _uart_part(m).receive_break(),
            "modem": _modem,
            "poll": lambda m, p: _uart_part(m).poll(),
        },
        values={0x3FA: (0x00, 0x01, 0x07, 0x41, 0x87, 0xC7), 0x3FB: (0x03, 0x83, 0x1F, 0x80)},
    ),
    "i8254": Scenario(
        "i8254",
        _pit,
        (*_ports(64, 4), (97, (1,))),
        lines=(0,),
        host={"update": lambda m, p: m.parts["pit"].update()},
        values={0x43: (0x34, 0x36, 0x30, 0x32, 0x38, 0x3A, 0x74, 0xB6, 0xB0, 0x00, 0xC2, 0xE2, 0xD2, 0x10, 0x20)},
    ),
    "mc146818": Scenario(
        "mc146818",
        _rtc,
        ((0x70, (1,)), (0x71, (1,))),
        lines=(8,),
        host={"update": lambda m, p: m.parts["rtc"].update()},
        values={0x70: (*tuple(range(14)), 50, 64, 140), 0x71: (0x20, 0x26, 0x2F, 0x06, 0x02, 0x42, 0x72, 0x82)},
    ),
    "i8259-pair": Scenario(
        "i8259-pair",
        _pic,
        _ports(0x20, 2) + _ports(0xA0, 2) + _ports(0x4D0, 2),
        lines=(0,),
        host={
            "line": lambda m, p: m.parts["pic"].set_irq(p % 16, bool(p & 16)),
            "acknowledge": lambda m, p: m.parts["pic"].acknowledge(),
            "pending": lambda m, p: m.parts["pic"].pending_vector(),
        },
        values={
            0x20: (0x11, 0x19, 0x20, 0x0A, 0x0B, 0x0C, 0x60, 0x68, 0xC7, 0xA0, 0x13),
            0xA0: (0x11, 0x20, 0x0B, 0x0C, 0x68),
            0x21: (0x08, 0x04, 0x01, 0x03, 0x00, 0xFB),
            0xA1: (0x70, 0x02, 0x01, 0x00),
        },
    ),
    "i8042": Scenario(
        "i8042",
        _i8042,
        ((0x60, (1,)), (0x64, (1,))),
        lines=(1, 12),
        host={
            "key": lambda m, p: m.parts["kbc"].keyboard.send(bytes([p & 0xFF])),
            "move": lambda m, p: m.parts["kbc"].mouse.move((p & 0xFF) - 128, (p >> 8 & 0xFF) - 128, p >> 16 & 7),
        },
        values={
            0x64: (0x20, 0x60, 0xA7, 0xA8, 0xAA, 0xAD, 0xAE, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xDD, 0xDF),
            0x60: (0xF2, 0xED, 0xF0, 0xF3, 0xF4, 0xF5, 0xF6, 0xFF, 0xE9, 0xEB, 0xE8, 0x47, 0x02, 0x00),
        },
    ),
    "ata-channel": Scenario(
        "ata-channel",
        _ata,
        ((496, (1, 2, 4)), *_ports(497, 7), (1014, (1,))),
        lines=(14,),
        values={
            0x1F7: ATA_COMMANDS,
            0x1F6: (0x00, 0x10, 0xE0, 0xF0, 0xA0),
            0x1F2: (0, 1, 2, 3, 8, 16),
            0x3F6: (0, 2, 4, 0x80),
        },
    ),
    "pci-host": Scenario(
        "pci-host",
        _pci,
        ((3320, (1, 2, 4)), *_ports(3321, 3), (3324, (1, 2, 4)), (3325, (1, 2)), (3326, (1, 2)), (3327, (1,))),
        values={0xCF8: PCI_ADDRESSES, 0xCFC: (0xFFFF_FFFF, 0x0000_0007, 0xC000, 0xF000_0000)},
    ),
    "port92": Scenario("port92", _port92, ((0x92, (1,)),)),
    "port61": Scenario("port61", _port61, ((0x61, (1,)),)),
    "debug": Scenario("debug", _debug, ((0x402, (1,)), (0x80, (1,)), (0x501, (1, 2)))),
    "pc": Scenario(
        "pc",
        _pc,
        _ports(0x20, 2)
        + _ports(0x40, 4)
        + (
            (0x60, (1,)),
            (0x61, (1,)),
            (0x64, (1,)),
            (0x70, (1,)),
            (0x71, (1,)),
            (0x80, (1,)),
            (0x92, (1,)),
            (0x1F0, (1, 2)),
            (0x1F7, (1,)),
            (0x3F8, (1,)),
            (0x3FD, (1,)),
            (0xCF8, (4,)),
            (0xCFC, (4,)),
            (0xE9, (1,)),
        ),
        lines=(0,),
        host={"poll": lambda m, p: m.parts["pc"].poll(), "ack": lambda m, p: m.parts["pc"].pic.acknowledge()},
    ),
}

# -- the golden files ---------------------------------------------------------------------------------------
# For each kind: the operations that bring the device into a state worth keeping, then the reads that a
# later version, restoring the file into a fresh device, must answer the same.

GOLDEN: dict[str, tuple[str, list[Op], list[Op]]] = {
    "uart16550": (
        "uart16550",
        [
            ("out", 0x3FB, 1, 0x83),
            ("out", 0x3F8, 1, 0x01),
            ("out", 0x3F9, 1, 0x00),
            ("out", 0x3FB, 1, 0x1B),
            ("out", 0x3FA, 1, 0x87),
            ("out", 0x3F9, 1, 0x0F),
            ("out", 0x3FC, 1, 0x0B),
            ("out", 0x3FF, 1, 0x5A),
            ("host", "receive", 0x0168),
            ("host", "receive_error", 0x17F),
            ("tick", 3),
            ("host", "modem", 0x5),
        ],
        [
            ("in", 0x3F9, 1),
            ("in", 0x3FA, 1),
            ("in", 0x3FB, 1),
            ("in", 0x3FC, 1),
            ("in", 0x3FD, 1),
            ("in", 0x3FE, 1),
            ("in", 0x3FF, 1),
            ("in", 0x3F8, 1),
            ("in", 0x3FD, 1),
            ("in", 0x3F8, 1),
            ("in", 0x3FA, 1),
            ("in", 0x3FD, 1),
            ("in", 0x3F8, 1),
            ("in", 0x3FD, 1),
            ("in", 0x3FA, 1),
        ],
    ),
    "i8254": (
        "i8254",
        [
            ("out", 0x43, 1, 0x34),
            ("out", 0x40, 1, 0xE8),
            ("out", 0x40, 1, 0x03),
            ("out", 0x43, 1, 0xB6),
            ("out", 0x42, 1, 0x33),
            ("out", 0x42, 1, 0x02),
            ("out", 0x61, 1, 0x03),
            ("out", 0x43, 1, 0x70),
            ("out", 0x41, 1, 0x10),
            ("tick", 1),
            ("out", 0x43, 1, 0x00),
        ],
        [
            ("in", 0x40, 1),
            ("in", 0x40, 1),
            ("in", 0x42, 1),
            ("in", 0x42, 1),
            ("in", 0x41, 1),
            ("in", 0x41, 1),
            ("in", 0x40, 1),
            ("in", 0x40, 1),
        ],
    ),
    "port61": ("port61", [("out", 0x61, 1, 0x0E), ("tick", 1)], [("in", 0x61, 1)]),
    "mc146818": (
        "mc146818",
        [
            ("out", 0x70, 1, 0x0B),
            ("out", 0x71, 1, 0x42),
            ("out", 0x70, 1, 0x01),
            ("out", 0x71, 1, 0x02),
            ("out", 0x70, 1, 0x40),
            ("out", 0x71, 1, 0xAB),
            ("tick", 1536),
            ("host", "update", 0),
            ("out", 0x70, 1, 0x80),
        ],
        [("in", 0x71, 1)]
        + [
            op
            for index in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32, 0x0A, 0x0B, 0x0C, 0x0C, 0x40, 0x01)
            for op in (("out", 0x70, 1, index), ("in", 0x71, 1))
        ],
    ),
    "i8259-pair": (
        "i8259-pair",
        [
            ("out", 0x20, 1, 0x11),
            ("out", 0x21, 1, 0x08),
            ("out", 0x21, 1, 0x04),
            ("out", 0x21, 1, 0x01),
            ("out", 0xA0, 1, 0x11),
            ("out", 0xA1, 1, 0x70),
            ("out", 0xA1, 1, 0x02),
            ("out", 0xA1, 1, 0x01),
            ("out", 0x21, 1, 0xB8),
            ("out", 0x4D1, 1, 0x0C),
            ("host", "line", 16 | 1),
            ("host", "line", 16 | 12),
            ("host", "acknowledge", 0),
            ("host", "line", 16 | 0),
        ],
        [("in", 0x21, 1), ("in", 0xA1, 1), ("in", 0x20, 1), ("in", 0xA0, 1), ("in", 0x4D0, 1), ("in", 0x4D1, 1)],
    ),
    "i8042": (
        "i8042",
        [
            ("out", 0x64, 1, 0x60),
            ("out", 0x60, 1, 0x47),
            ("out", 0x64, 1, 0xAA),
            ("out", 0x60, 1, 0xF2),
            ("host", "key", 0x1C),
            ("out", 0x64, 1, 0xD4),
            ("out", 0x60, 1, 0xF3),
            ("out", 0x64, 1, 0xD4),
        ],
        [
            ("in", 0x64, 1),
            ("in", 0x60, 1),
            ("in", 0x64, 1),
            ("in", 0x60, 1),
            ("in", 0x60, 1),
            ("in", 0x60, 1),
            ("in", 0x60, 1),
            ("in", 0x64, 1),
            ("in", 0x60, 1),
        ],
    ),
    "ata-channel": (
        "ata-channel",
        [
            ("out", 0x1F6, 1, 0xE0),
            ("out", 0x1F2, 1, 2),
            ("out", 0x1F3, 1, 5),
            ("out", 0x1F4, 1, 0),
            ("out", 0x1F5, 1, 0),
            ("out", 0x1F7, 1, 0x20),
            ("in", 0x1F0, 4),
            ("in", 0x1F0, 2),
        ],
        [
            ("in", 0x3F6, 1),
            ("in", 0x1F1, 1),
            ("in", 0x1F2, 1),
            ("in", 0x1F3, 1),
            ("in", 0x1F6, 1),
            ("in", 0x1F0, 2),
            ("in", 0x1F0, 4),
            ("in", 0x1F7, 1),
        ],
    ),
    "pci-host": (
        "pci-host",
        [
            ("out", 0xCF8, 4, 0x8000_1804),
            ("out", 0xCFC, 2, 0x0003),
            ("out", 0xCF8, 4, 0x8000_1810),
            ("out", 0xCFC, 4, 0xFFFF_FFFF),
            ("out", 0xCF8, 4, 0x8000_1814),
            ("out", 0xCFC, 4, 0xFEB0_0000),
            ("out", 0xCF8, 4, 0x8000_0004),
        ],
        [("in", 0xCF8, 4), ("in", 0xCFC, 4), ("in", 0xCF9, 1)],
    ),
    "port92": ("port92", [("out", 0x92, 1, 0x02)], [("in", 0x92, 1)]),
    "debugcon": ("debug", [("out", 0x402, 1, 0x41)], [("in", 0x402, 1)]),
    "post-codes": ("debug", [("out", 0x80, 1, 0x10), ("out", 0x80, 1, 0x55)], [("in", 0x80, 1)]),
    "debug-exit": ("debug", [("out", 0x501, 2, 0x21)], [("in", 0x501, 2)]),
}
"""Per kind: the scenario, the operations before the save, and those after the restore, whose results
the golden file records."""


def checks(machine: Machine, scenario: Scenario, ops: Sequence[Op]) -> list[list[Any]]:
    """Apply ``ops``; each as [op..., what it returned (the value read, or null)]."""
    return [[*op, seen[0]] for op, seen in zip(ops, run(machine, scenario, ops), strict=True)]


def only(document: dict[str, Any], kind: str) -> dict[str, Any]:
    """The document with only the devices of ``kind`` (the debug scenario serves three kinds)."""
    devices = {name: entry for name, entry in document["devices"].items() if entry["kind"] == kind}
    return {**document, "devices": devices}
