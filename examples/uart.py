"""A 16550 UART as an ``@on_port`` device (COM1 at 0x3F8-0x3FF by default).

Registers by offset from the base (DLAB is LCR bit 7):

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

Transmitted bytes go to ``sink``; bytes for the guest are queued with
:meth:`Uart16550.receive`. With MCR loopback set, transmitted bytes come
back as received ones and the modem outputs drive the modem inputs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from dispatcher import PortAccess, on_port

__all__ = ["Uart16550"]

# LSR bits
DR, OE, THRE, TEMT = 0x01, 0x02, 0x20, 0x40
# IIR values (bit 0 set means no interrupt pending)
IIR_NONE, IIR_THRE, IIR_RDA = 0x01, 0x02, 0x04
# IER bits
ERBFI, ETBEI = 0x01, 0x02
# MCR bits
LOOP = 0x10


class Uart16550:
    """The registers of a 16550 UART and what the guest sees through them."""

    def __init__(self, sink: Callable[[bytes], object] = lambda data: None, *, io_base: int = 0x3F8) -> None:
        self.io_base = io_base
        self.sink = sink
        self.rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.lsr_errors = 0
        self.scr = 0
        self.divisor = 12  # 9600 baud from the 1.8432 MHz clock
        self.fcr = 0
        self.thre_pending = False

    def receive(self, data: bytes) -> None:
        """Queue bytes that the guest will read from RBR."""
        self.rx.extend(data)

    @property
    def lsr(self) -> int:
        # The transmitter is infinitely fast: THR and the shift register are always empty.
        return (DR if self.rx else 0) | self.lsr_errors | THRE | TEMT

    @property
    def iir(self) -> int:
        fifo = 0xC0 if self.fcr & 1 else 0
        if self.ier & ERBFI and self.rx:
            return IIR_RDA | fifo
        if self.ier & ETBEI and self.thre_pending:
            return IIR_THRE | fifo
        return IIR_NONE | fifo

    @property
    def msr(self) -> int:
        if self.mcr & LOOP:
            # Loopback wires RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
            m = self.mcr
            return (m & 2) << 3 | (m & 1) << 5 | (m & 4) << 4 | (m & 8) << 4
        return 0xB0  # CTS, DSR, DCD: a terminal is attached

    @on_port(0, 8, max_size=1)
    def registers(self, access: PortAccess) -> int | None:
        """Every register. The chip's bus is 8 bits wide, so wider accesses arrive as bytes."""
        dlab = self.lcr & 0x80
        offset = access.offset
        if access.is_write:
            value = access.value & 0xFF
            if offset == 0:
                if dlab:
                    self.divisor = (self.divisor & 0xFF00) | value
                elif self.mcr & LOOP:
                    self.rx.append(value)
                else:
                    self.sink(bytes([value]))
                    self.thre_pending = True
            elif offset == 1:
                if dlab:
                    self.divisor = (self.divisor & 0xFF) | value << 8
                else:
                    # Enabling ETBEI with THR empty raises THRE at once.
                    self.thre_pending = bool(value & ETBEI and not self.ier & ETBEI) or self.thre_pending
                    self.ier = value & 0x0F
            elif offset == 2:
                self.fcr = value & 0xC9
                if value & 0x02:
                    self.rx.clear()
            elif offset == 3:
                self.lcr = value
            elif offset == 4:
                self.mcr = value & 0x1F
            elif offset == 7:
                self.scr = value
            return None
        if offset == 0:
            if dlab:
                return self.divisor & 0xFF
            return self.rx.popleft() if self.rx else 0
        if offset == 1:
            return self.divisor >> 8 if dlab else self.ier
        if offset == 2:
            iir = self.iir
            if iir & 0x0F == IIR_THRE:
                self.thre_pending = False  # reading IIR clears a THRE interrupt
            return iir
        if offset == 3:
            return self.lcr
        if offset == 4:
            return self.mcr
        if offset == 5:
            lsr = self.lsr
            self.lsr_errors = 0
            return lsr
        if offset == 6:
            return self.msr
        return self.scr
