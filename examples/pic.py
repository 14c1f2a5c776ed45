"""The PC's pair of i8259A programmable interrupt controllers, cascaded on IRQ 2.

Constructors::

    I8259(*, io_base=0x20, is_master=True, elcr_mask=0xF8, name="master")
    PicPair(*, io_base=0x20, slave_base=0xA0, elcr_base=0x4D0, irq: IrqLine | None = None)

:class:`PicPair` is what a PC uses: ``router.include(pics)`` installs the
master at ``io_base`` (0x20/0x21), the slave at ``slave_base`` (0xA0/0xA1)
and the PIIX edge/level control registers at ``elcr_base`` (0x4D0/0x4D1;
``None`` leaves them out). It is the :class:`~dispatcher.IrqReceiver` of
device lines 0-15 and drives ``irq`` with its INTR output. The CPU side asks
:meth:`PicPair.pending_vector` (no side effects) and runs the interrupt
acknowledge cycle with :meth:`PicPair.acknowledge`.

Each chip has two ports, both 8 bits wide (wider accesses arrive as bytes):

=====  ================================  ===================================
off    write                             read
=====  ================================  ===================================
0      ICW1 (bit 4), OCW3 (bit 3), OCW2  IRR or ISR (OCW3 RR/RIS), poll word
1      ICW2-ICW4 while initialising,     IMR, or the poll word after a poll
       else OCW1 (IMR)                   command
=====  ================================  ===================================

An input is edge triggered unless ICW1 LTIM or its ELCR bit makes it level
triggered. An edge-triggered request is latched in IRR on the rising edge
and survives the line falling again (a pulse is one request); a level
request follows the line. Not modelled: the MCS-80/85 call sequence (the
ICW1 ADI bit and ICW2's low bits), buffered mode, and bus timing.

Device state (kind ``i8259-pair``, version 1): each chip's registers and
initialization sequence, its ELCR and the levels of its input pins as the
chip last saw them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dispatcher import IrqLine, PortAccess, StateFields, on_port

__all__ = ["I8259", "PicPair"]

_NO_IRQ = 8  # what _priority returns when no bit is set


class I8259:
    """One 8259A: its registers, priority resolver and the two ports at ``io_base``.

    ``elcr_mask`` names the inputs whose ELCR bit may be set (the PIIX fixes
    IRQ 0, 1, 2, 8 and 13 to edge). ``output`` is called with the INT pin's
    level whenever it may have changed; :class:`PicPair` wires it.
    """

    def __init__(
        self, *, io_base: int = 0x20, is_master: bool = True, elcr_mask: int = 0xF8, name: str = "master"
    ) -> None:
        self.io_base = io_base
        self.is_master = is_master
        self.elcr_mask = elcr_mask
        self.name = name
        self.output: Callable[[bool], None] = lambda level: None
        self.elcr = 0
        self.irr = 0
        self.imr = 0
        self.isr = 0
        self.levels = 0  # the input pins as they are now
        self.reset()

    def reset(self) -> None:
        """The state ICW1 leaves behind (the ELCR and the input pins are not part of the chip's init)."""
        self.level_triggered = False  # ICW1 LTIM
        # The edge sense circuit is reset: an input must go low before its next request.
        self.edge_armed = ~self.levels & 0xFF
        self.irr = self._level_mask() & self.levels
        self.imr = 0
        self.isr = 0
        self.lowest = 7  # IR number with the lowest priority; rotation moves it
        self.vector_base = 0
        self.read_isr = False
        self.poll = False
        self.special_mask = False
        self.init_step = 0  # 0: operating; 2, 3, 4: ICW2, ICW3 or ICW4 comes next
        self.needs_icw4 = False
        self.single = False
        self.cascade = 0  # ICW3 as written
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested = False
        self.icw4 = 0

    _BYTES = ("elcr", "irr", "imr", "isr", "levels", "edge_armed", "vector_base", "cascade", "icw4")
    _FLAGS = ("level_triggered", "read_isr", "poll", "special_mask", "needs_icw4", "single", "auto_eoi",
              "rotate_on_auto_eoi", "special_fully_nested")  # fmt: skip

    def save(self) -> dict[str, Any]:
        """The chip's registers, mode bits and input levels."""
        state: dict[str, Any] = {name: getattr(self, name) for name in self._BYTES + self._FLAGS}
        state["lowest"], state["init_step"] = self.lowest, self.init_step
        return state

    def check(self, f: StateFields) -> Callable[[], None]:
        """Check a saved chip; return what puts it into this one."""
        values: dict[str, object] = {name: f.integer(name, 0, 0xFF) for name in self._BYTES}
        values.update({name: f.boolean(name) for name in self._FLAGS})
        values["lowest"] = f.integer("lowest", 0, 7)
        values["init_step"] = f.choice("init_step", (0, 2, 3, 4))
        elcr = f.integer("elcr", 0, 0xFF)
        if elcr & ~self.elcr_mask:
            raise f.error("elcr", f"is {elcr:#04x}: this chip's ELCR has only bits {self.elcr_mask:#04x}")

        def apply() -> None:
            for name, value in values.items():
                setattr(self, name, value)

        return apply

    # -- inputs and the priority resolver --------------------------------------------------------

    def _level_mask(self) -> int:
        return 0xFF if self.level_triggered else self.elcr

    def set_input(self, pin: int, level: bool) -> None:
        """Drive input IR``pin`` to ``level``."""
        bit = 1 << pin
        if bool(self.levels & bit) == level:
            return  # the wire did not change (a restored device driving its line to the saved level)
        if level:
            self.levels |= bit
        else:
            self.levels &= ~bit
        if self._level_mask() & bit:
            self.irr = self.irr | bit if level else self.irr & ~bit
            self.edge_armed |= bit
        elif level:
            if self.edge_armed & bit:
                self.irr |= bit
                self.edge_armed &= ~bit
        else:
            self.edge_armed |= bit
        self._update()

    def _priority(self, bits: int) -> int:
        """How far from the highest priority the highest set bit of ``bits`` is, or _NO_IRQ."""
        if not bits:
            return _NO_IRQ
        for rank in range(8):
            if bits & 1 << ((self.lowest + 1 + rank) & 7):
                return rank
        return _NO_IRQ  # unreachable: bits is an 8-bit value

    def set_elcr(self, value: int) -> None:
        """Write the ELCR: a set bit makes that input level triggered (bits outside ``elcr_mask`` stay 0)."""
        self.elcr = value & self.elcr_mask
        # A line now level triggered requests while it is high; one now edge
        # triggered keeps what it latched.
        level = self._level_mask()
        self.irr = (self.irr & ~level) | (self.levels & level)
        self._update()

    def _pin(self, rank: int) -> int:
        return (self.lowest + 1 + rank) & 7

    def requested(self) -> int | None:
        """The input the INT pin is asserted for, or None."""
        rank = self._priority(self.irr & ~self.imr)
        if rank == _NO_IRQ:
            return None
        in_service = self.isr
        if self.special_mask:
            in_service &= ~self.imr
        if self.special_fully_nested and self.is_master:
            # A slave in service does not block another request from the same slave.
            in_service &= ~self.cascade
        if rank < self._priority(in_service):
            return self._pin(rank)
        return None

    def _update(self) -> None:
        self.output(self.requested() is not None)

    def acknowledge(self, pin: int) -> None:
        """The INTA cycle for ``pin``: the request moves from IRR to ISR (or is retired, with AEOI)."""
        bit = 1 << pin
        if not self._level_mask() & bit:
            self.irr &= ~bit
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.lowest = pin
        else:
            self.isr |= bit
        self._update()

    def poll_word(self) -> int:
        """The poll command's answer: 0x80 | IR number with a request (acknowledged), else 0."""
        self.poll = False
        pin = self.requested()
        if pin is None:
            return 0
        self.acknowledge(pin)
        return 0x80 | pin

    # -- the ports ------------------------------------------------------------------------------

    @on_port(0, 2, max_size=1)
    def registers(self, access: PortAccess) -> int | None:
        """The command (offset 0) and data (offset 1) ports."""
        if access.is_write:
            if access.offset == 0:
                self._write_command(access.value & 0xFF)
            else:
                self._write_data(access.value & 0xFF)
            return None
        if self.poll:
            return self.poll_word()
        if access.offset == 1:
            return self.imr
        return self.isr if self.read_isr else self.irr

    def _write_command(self, value: int) -> None:
        if value & 0x10:  # ICW1
            self.reset()
            self.needs_icw4 = bool(value & 0x01)
            self.single = bool(value & 0x02)
            self.level_triggered = bool(value & 0x08)
            self.irr = self._level_mask() & self.levels
            self.init_step = 2
        elif value & 0x08:  # OCW3
            if value & 0x02:
                self.read_isr = bool(value & 0x01)
            self.poll = bool(value & 0x04)
            if value & 0x40:
                self.special_mask = bool(value & 0x20)
        else:  # OCW2: R, SL, EOI in bits 7-5; the IR level in bits 2-0
            self._ocw2(value >> 5, value & 7)
        self._update()

    def _ocw2(self, command: int, pin: int) -> None:
        if command in (0b001, 0b101):  # non-specific EOI, optionally rotating
            rank = self._priority(self.isr)
            if rank == _NO_IRQ:
                return
            pin = self._pin(rank)
            self.isr &= ~(1 << pin)
            if command == 0b101:
                self.lowest = pin
        elif command in (0b011, 0b111):  # specific EOI, optionally rotating
            self.isr &= ~(1 << pin)
            if command == 0b111:
                self.lowest = pin
        elif command == 0b110:  # set priority
            self.lowest = pin
        elif command in (0b100, 0b000):
            self.rotate_on_auto_eoi = command == 0b100
        # 0b010 is a no-operation

    def _write_data(self, value: int) -> None:
        step = self.init_step
        if step == 0:  # OCW1
            self.imr = value
        elif step == 2:  # ICW2: in 8086 mode only T7-T3 count
            self.vector_base = value & 0xF8
            self.init_step = 3 if not self.single else (4 if self.needs_icw4 else 0)
        elif step == 3:  # ICW3
            self.cascade = value
            self.init_step = 4 if self.needs_icw4 else 0
        else:  # ICW4
            self.icw4 = value
            self.auto_eoi = bool(value & 0x02)
            self.special_fully_nested = bool(value & 0x10)
            self.init_step = 0
        self._update()


class PicPair:
    """Master and slave 8259A cascaded on the master's IR2, with the PIIX ELCR pair.

    Lines 0-7 go to the master, 8-15 to the slave. ``irq`` receives the
    master's INT output.
    """

    state_kind = "i8259-pair"
    state_version = 1
    oldest_state_version = 1

    def __init__(
        self,
        *,
        io_base: int = 0x20,
        slave_base: int = 0xA0,
        elcr_base: int | None = 0x4D0,
        irq: IrqLine | None = None,
    ) -> None:
        self.io_base = io_base
        self.irq = irq if irq is not None else IrqLine(name="INTR")
        self.master = I8259(io_base=io_base, is_master=True, elcr_mask=0xF8, name="master")
        self.slave = I8259(io_base=slave_base, is_master=False, elcr_mask=0xDE, name="slave")
        self.master.output = self.irq.set
        self.slave.output = lambda level: self.master.set_input(2, level)
        # Router.include installs marked attributes at io_base plus their offset;
        # the slave's and the ELCR's are marked per instance because their bases are arguments.
        slave = self.slave

        def slave_ports(access: PortAccess) -> int | None:
            return slave.registers(access)

        self.slave_ports = on_port(slave_base - io_base, 2, max_size=1)(slave_ports)
        if elcr_base is not None:
            elcr = self._elcr

            def elcr_ports(access: PortAccess) -> int | None:
                return elcr(access)

            self.elcr_ports = on_port(elcr_base - io_base, 2, max_size=1)(elcr_ports)

    def reset(self) -> None:
        """Power-on: each chip as ICW1 leaves it, ELCRs 00h (edge), INTR low.

        The 8259A has no reset pin: software must initialize it, and ICW1
        clears IMR and ISR, sets IR7 lowest priority, special mask mode off and
        IRR to be read (8259A datasheet, "Initialization Command Words"). The
        PIIX's ELCR registers reset to 00h. Input pin levels are inputs and stay.
        """
        for chip in (self.master, self.slave):
            chip.elcr = 0
            chip.reset()
        self.irq.set(self.master.requested() is not None)

    def save(self) -> dict[str, Any]:
        """Both chips."""
        return {"master": self.master.save(), "slave": self.slave.save()}

    def restore(self, state: Mapping[str, Any], version: int) -> None:
        """Take a state :meth:`save` returned; check both chips first."""
        f = StateFields(f"{self.state_kind}@{self.io_base:#x}", state)
        master, slave = self.master.check(f.section("master")), self.slave.check(f.section("slave"))
        master()
        slave()
        # The saved levels include the slave's INT on the master's IR2: drive INTR only.
        self.irq.set(self.master.requested() is not None)

    @on_port(0, 2, max_size=1)
    def master_ports(self, access: PortAccess) -> int | None:
        """The master's command and data ports."""
        return self.master.registers(access)

    def _elcr(self, access: PortAccess) -> int | None:
        chip = self.slave if access.offset else self.master
        if not access.is_write:
            return chip.elcr
        chip.set_elcr(access.value)
        return None

    def set_irq(self, line: int, level: bool) -> None:
        """Drive ISA line 0-15 (the :class:`~dispatcher.IrqReceiver` protocol)."""
        if not 0 <= line <= 15:
            raise ValueError(f"the PIC pair has lines 0-15, not {line}")
        if line < 8:
            self.master.set_input(line, level)
        else:
            self.slave.set_input(line - 8, level)

    @property
    def output(self) -> bool:
        """The level of the INT pin to the CPU."""
        return self.master.requested() is not None

    def pending_vector(self) -> int | None:
        """The vector :meth:`acknowledge` would return now, or None if INT is low. No side effects."""
        pin = self.master.requested()
        if pin is None:
            return None
        if pin == 2 and not self.master.single:
            slave_pin = self.slave.requested()
            return self.slave.vector_base + (7 if slave_pin is None else slave_pin)
        return self.master.vector_base + pin

    def acknowledge(self) -> int:
        """The interrupt acknowledge cycle: move the winning request to ISR and return its vector.

        With no request pending this is a spurious interrupt: the master answers
        its IR7 vector and sets no ISR bit. If the slave loses its request
        between the two, the master's IR2 is in service and the slave answers its
        IR7 vector, as the datasheet describes.
        """
        master = self.master
        pin = master.requested()
        if pin is None:
            return master.vector_base + 7
        master.acknowledge(pin)
        if pin != 2 or master.single:
            return master.vector_base + pin
        slave_pin = self.slave.requested()
        if slave_pin is None:
            return self.slave.vector_base + 7
        self.slave.acknowledge(slave_pin)
        return self.slave.vector_base + slave_pin
