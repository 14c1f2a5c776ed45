"""A 16550A UART as an ``@on_port`` device (COM1 at 0x3F8-0x3FF by default).

Constructor::

    Uart16550(sink=lambda data: None, *, io_base=0x3F8, irq: IrqLine | None = None,
              source: Callable[[], bytes] | None = None, clock: Callable[[], float] = time.monotonic,
              out2_gates_irq: bool = True)

Registers by offset from the base (DLAB is LCR bit 7); the chip's bus is 8
bits wide, so wider accesses arrive as byte accesses:

=====  ====================  ======================
off    read                  write
=====  ====================  ======================
0      RBR (DLAB=0), DLL     THR (DLAB=0), DLL
1      IER (DLAB=0), DLM     IER (DLAB=0), DLM
2      IIR                   FCR
3      LCR                   LCR
4      MCR                   MCR
5      LSR                   (ignored)
6      MSR                   (ignored)
7      SCR                   SCR
=====  ====================  ======================

Transmitted bytes go to ``sink`` at once: the transmitter is infinitely
fast, so THR, the transmit FIFO and the shift register are always empty by
the time the guest looks. Bytes for the guest come from :meth:`receive` or
from ``source``, a non-blocking callable returning whatever bytes have
arrived (``b""`` if none), which the UART calls whenever it has room and
the guest looks at RBR, IIR or LSR, or :meth:`poll` runs. Host bytes wait on
the "line" until the receive FIFO (16 bytes, or the 1-byte holding register
with FIFOs off) has room, so a slow guest never loses them; an overrun can
only happen in loopback, as when the guest outruns itself.

The character timeout (IIR 0xC) fires when the FIFO holds bytes below the
trigger level and nothing has been received or read for four character
times at the programmed divisor and frame format, by ``clock``. A machine
loop calls :meth:`poll` (or waits until :meth:`next_due`) to notice it
without a guest access. With ``out2_gates_irq`` the interrupt reaches
``irq`` only while MCR OUT2 is set and loopback is off, as PC boards wire
it. The object is not thread-safe: call it from the dispatcher's thread.

Device state (kind ``uart16550``, version 1): the registers, the receive
FIFO, the host bytes still waiting on the line, and the time since the
receiver's last activity (re-based on restore, so a saved character timeout
is as near as it was). The divisor latch and SCR keep their values across
:meth:`~Uart16550.reset`, as the datasheet's reset table says.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dispatcher import IrqLine, PortAccess, StateFields, on_port

__all__ = ["Uart16550"]

# LSR bits
DR, OE, PE, FE, BI, THRE, TEMT, RXFE = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
LSR_ERRORS = OE | PE | FE | BI
# IIR interrupt identification, highest priority first (bit 0 set means none pending)
IIR_LINE_STATUS, IIR_RX_DATA, IIR_RX_TIMEOUT, IIR_THRE, IIR_MODEM, IIR_NONE = 0x06, 0x04, 0x0C, 0x02, 0x00, 0x01
# IER bits
ERBFI, ETBEI, ELSI, EDSSI = 0x01, 0x02, 0x04, 0x08
# FCR bits
FIFO_ENABLE, RX_RESET = 0x01, 0x02  # bit 2, transmitter FIFO reset, has nothing to clear here
TRIGGER_LEVELS = (1, 4, 8, 14)
# MCR bits
DTR, RTS, OUT1, OUT2, LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
# MSR bits: deltas in 0-3, lines in 4-7
DCTS, DDSR, TERI, DDCD, CTS, DSR, RI, DCD = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

FIFO_SIZE = 16
XTAL = 1_843_200  # the PC's UART clock, Hz


class Uart16550:
    """The registers of a 16550A UART and what the guest sees through them."""

    state_kind = "uart16550"
    state_version = 1
    oldest_state_version = 1

    def __init__(
        self,
        sink: Callable[[bytes], object] = lambda data: None,
        *,
        io_base: int = 0x3F8,
        irq: IrqLine | None = None,
        source: Callable[[], bytes] | None = None,
        clock: Callable[[], float] = time.monotonic,
        out2_gates_irq: bool = True,
    ) -> None:
        self.io_base = io_base
        self.sink = sink
        self.irq = irq if irq is not None else IrqLine(name=f"UART@{io_base:#x}")
        self.source = source
        self.clock = clock
        self.out2_gates_irq = out2_gates_irq
        self.line: deque[int] = deque()  # host bytes not yet in the receiver
        self.rx: deque[int] = deque()  # the receive FIFO: byte | error bits << 8
        self.divisor = 12  # 9600 baud; the divisor latch is not touched by reset
        self.scr = 0
        self.modem_inputs = CTS | DSR | DCD  # a terminal is attached
        self.reset()

    def reset(self) -> None:
        """Master reset: the register values of the datasheet's reset table."""
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.fcr = 0
        self.lsr_errors = 0  # OE, PE, FE, BI as the guest will next read them
        self.msr_deltas = 0
        self.thre_pending = False
        self.last_rx = 0
        self.rx.clear()
        self.rx_activity = self.clock()
        self._update_irq()

    def save(self) -> dict[str, Any]:
        """The registers, FIFO, waiting host bytes and receiver idle time (see the module's docstring)."""
        return {
            "ier": self.ier,
            "lcr": self.lcr,
            "mcr": self.mcr,
            "fcr": self.fcr,
            "divisor": self.divisor,
            "scr": self.scr,
            "lsr_errors": self.lsr_errors,
            "msr_deltas": self.msr_deltas,
            "modem_inputs": self.modem_inputs,
            "thre_pending": self.thre_pending,
            "last_rx": self.last_rx,
            "rx": list(self.rx),
            "line": list(self.line),
            "rx_idle": self.clock() - self.rx_activity,
        }

    def restore(self, state: Mapping[str, Any], version: int) -> None:
        """Take a state :meth:`save` returned; check every field first."""
        f = StateFields(f"{self.state_kind}@{self.io_base:#x}", state)
        ier, lcr, mcr = f.integer("ier", 0, 0x0F), f.integer("lcr", 0, 0xFF), f.integer("mcr", 0, 0x1F)
        fcr = f.integer("fcr", 0, 0xC9)
        if fcr & ~0xC9 or (fcr and not fcr & FIFO_ENABLE):
            raise f.error("fcr", f"is {fcr:#x}: bits 1-2 and 4-5 clear themselves, bits 6-7 need FIFO enable")
        divisor, scr = f.integer("divisor", 0, 0xFFFF), f.integer("scr", 0, 0xFF)
        lsr_errors = f.integer("lsr_errors", 0, LSR_ERRORS)
        msr_deltas = f.integer("msr_deltas", 0, 0x0F)
        modem_inputs = f.integer("modem_inputs", 0, 0xF0)
        if lsr_errors & ~LSR_ERRORS or modem_inputs & 0x0F:
            raise f.error("lsr_errors" if lsr_errors & ~LSR_ERRORS else "modem_inputs", "has bits the chip has not")
        thre_pending, last_rx = f.boolean("thre_pending"), f.integer("last_rx", 0, 0xFF)
        # An entry is a character and the error bits it arrived with (PE, FE, BI).
        rx = f.ints("rx", 0, 0x1CFF, max_length=FIFO_SIZE if fcr & FIFO_ENABLE else 1)
        line = f.ints("line", 0, 0x1CFF, max_length=1 << 24)
        rx_idle = f.number("rx_idle", 0.0)
        self.ier, self.lcr, self.mcr, self.fcr, self.divisor, self.scr = ier, lcr, mcr, fcr, divisor, scr
        self.lsr_errors, self.msr_deltas, self.modem_inputs = lsr_errors, msr_deltas, modem_inputs
        self.thre_pending, self.last_rx = thre_pending, last_rx
        self.rx, self.line = deque(rx), deque(line)
        self.rx_activity = self.clock() - rx_idle
        self._update_irq()

    # -- the host side ----------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Queue bytes from the host for the guest to read."""
        self._arrive(data)

    def receive_error(self, byte: int = 0, *, parity: bool = False, framing: bool = False) -> None:
        """Queue one character that arrives with a parity and/or framing error."""
        self._arrive([byte & 0xFF | ((PE if parity else 0) | (FE if framing else 0)) << 8])

    def receive_break(self) -> None:
        """Queue a break: it arrives as a zero character with BI and FE set."""
        self._arrive([(BI | FE) << 8])

    def _arrive(self, entries: Iterable[int]) -> None:
        self.line.extend(entries)
        self._fill()
        self._update_irq()

    def set_modem_inputs(self, *, cts: bool = True, dsr: bool = True, ri: bool = False, dcd: bool = True) -> None:
        """Drive the modem status inputs; changes set the MSR delta bits."""
        old = self._modem_lines()
        self.modem_inputs = (CTS if cts else 0) | (DSR if dsr else 0) | (RI if ri else 0) | (DCD if dcd else 0)
        self._modem_changed(old)
        self._update_irq()

    def poll(self) -> None:
        """Pull from ``source`` and raise a due character timeout: what a machine loop calls."""
        self._fill()
        self._update_irq()

    def next_due(self) -> float | None:
        """When, by ``clock``, a character timeout will fire without anything else happening, or None."""
        if not self._timeout_possible():
            return None
        return self.rx_activity + self.char_time() * 4

    # -- derived state ----------------------------------------------------------------------------

    @property
    def fifo_enabled(self) -> bool:
        return bool(self.fcr & FIFO_ENABLE)

    @property
    def trigger_level(self) -> int:
        return TRIGGER_LEVELS[self.fcr >> 6] if self.fifo_enabled else 1

    def char_time(self) -> float:
        """Seconds per character: start bit, 5-8 data bits, parity, 1-2 stop bits at the current baud rate."""
        word = 5 + (self.lcr & 3)
        stop = (1.5 if word == 5 else 2.0) if self.lcr & 0x04 else 1.0
        bits = 1 + word + (1 if self.lcr & 0x08 else 0) + stop
        return bits * 16 * (self.divisor or 0x10000) / XTAL

    def _timeout_possible(self) -> bool:
        return self.fifo_enabled and bool(self.rx) and len(self.rx) < self.trigger_level

    def _rx_timeout(self) -> bool:
        return self._timeout_possible() and self.clock() - self.rx_activity >= 4 * self.char_time()

    @property
    def lsr(self) -> int:
        value = self.lsr_errors | THRE | TEMT  # the transmitter is always empty
        if self.rx:
            value |= DR
            if self.fifo_enabled and any(entry >> 8 for entry in self.rx):
                value |= RXFE
        return value

    @property
    def msr(self) -> int:
        return self.msr_deltas | self._modem_lines()

    def _modem_lines(self) -> int:
        if self.mcr & LOOP:
            # Loopback wires RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
            m = self.mcr
            return (m & RTS) << 3 | (m & DTR) << 5 | (m & OUT1) << 4 | (m & OUT2) << 4
        return self.modem_inputs

    def _modem_changed(self, old: int) -> None:
        changed = old ^ self._modem_lines()
        # DCTS, DDSR and DDCD flag any change; TERI only RI's trailing edge.
        self.msr_deltas |= (changed >> 4) & (DCTS | DDSR | DDCD)
        if changed & old & RI:
            self.msr_deltas |= TERI

    @property
    def iir(self) -> int:
        """The highest-priority pending interrupt, with bits 6-7 set while the FIFOs are enabled."""
        fifo = 0xC0 if self.fifo_enabled else 0
        ier = self.ier
        if ier & ELSI and self.lsr_errors:
            return IIR_LINE_STATUS | fifo
        if ier & ERBFI:
            if len(self.rx) >= self.trigger_level:
                return IIR_RX_DATA | fifo
            if self._rx_timeout():
                return IIR_RX_TIMEOUT | fifo
        if ier & ETBEI and self.thre_pending:
            return IIR_THRE | fifo
        if ier & EDSSI and self.msr_deltas:
            return IIR_MODEM | fifo
        return IIR_NONE | fifo

    def _update_irq(self) -> None:
        gate = not self.out2_gates_irq or (self.mcr & (OUT2 | LOOP)) == OUT2
        self.irq.set(gate and not self.iir & IIR_NONE)

    # -- receiver ----------------------------------------------------------------------------------

    def _capacity(self) -> int:
        return FIFO_SIZE if self.fifo_enabled else 1

    def _fill(self) -> None:
        if self.source is not None and not self.line:
            self.line.extend(self.source())
        while self.line and len(self.rx) < self._capacity():
            self._push(self.line.popleft())

    def _push(self, entry: int) -> None:
        """One character reaches the receiver; if it is full, that is an overrun."""
        if len(self.rx) >= self._capacity():
            self.lsr_errors |= OE
            if not self.fifo_enabled:
                self.rx[0] = entry  # the new character overwrites RBR
                self.lsr_errors |= entry >> 8
            # with FIFOs, the character in the shift register is lost instead
            return
        if not self.rx:
            self.lsr_errors |= entry >> 8  # errors show when their character is at the top
        self.rx.append(entry)
        self.rx_activity = self.clock()

    def _read_rbr(self) -> int:
        self._fill()
        if self.rx:
            self.last_rx = self.rx.popleft() & 0xFF
            if self.rx:
                self.lsr_errors |= self.rx[0] >> 8
            self.rx_activity = self.clock()
            self._fill()
        elif self.fifo_enabled:
            return 0
        return self.last_rx

    def _write_fcr(self, value: int) -> None:
        if (value ^ self.fcr) & FIFO_ENABLE:
            self.rx.clear()  # switching the FIFOs on or off empties them
        if not value & FIFO_ENABLE:
            self.fcr = 0  # the other bits are only programmed together with FCR0
            return
        if value & RX_RESET:
            self.rx.clear()
            self.rx_activity = self.clock()
        self.fcr = value & 0xC9  # the reset bits clear themselves
        self._fill()

    # -- the ports --------------------------------------------------------------------------------

    @on_port(0, 8, max_size=1)
    def registers(self, access: PortAccess) -> int | None:
        """Every register, by offset."""
        if access.is_write:
            self._write(access.offset, access.value & 0xFF)
            value = None
        else:
            value = self._read(access.offset)
        self._update_irq()
        return value

    def _write(self, offset: int, value: int) -> None:
        dlab = self.lcr & 0x80
        if offset == 0:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif offset == 1:
            if dlab:
                self.divisor = (self.divisor & 0xFF) | value << 8
            else:
                if value & ETBEI and not self.ier & ETBEI:
                    self.thre_pending = True  # enabling ETBEI with THR empty interrupts at once
                self.ier = value & 0x0F
        elif offset == 2:
            self._write_fcr(value)
        elif offset == 3:
            self.lcr = value
        elif offset == 4:
            old = self._modem_lines()
            self.mcr = value & 0x1F
            self._modem_changed(old)
        elif offset == 7:
            self.scr = value

    def _transmit(self, value: int) -> None:
        # Writing THR clears the THRE interrupt; the byte leaves at once, so THR is
        # empty again and the interrupt is pending anew: an edge for each byte.
        self.thre_pending = False
        self._update_irq()
        if self.mcr & LOOP:
            self._push(value)
        else:
            self.sink(bytes([value]))
        self.thre_pending = True

    def _read(self, offset: int) -> int:
        dlab = self.lcr & 0x80
        if offset == 0:
            return self.divisor & 0xFF if dlab else self._read_rbr()
        if offset == 1:
            return self.divisor >> 8 if dlab else self.ier
        if offset == 2:
            self._fill()
            iir = self.iir
            if iir & 0x0F == IIR_THRE:
                self.thre_pending = False  # reading IIR clears a THRE interrupt it reports
            return iir
        if offset == 3:
            return self.lcr
        if offset == 4:
            return self.mcr
        if offset == 5:
            self._fill()
            lsr = self.lsr
            self.lsr_errors = 0
            return lsr
        if offset == 6:
            msr = self.msr
            self.msr_deltas = 0
            return msr
        return self.scr
