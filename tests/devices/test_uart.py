"""The 16550A UART at 0x3F8-0x3FF, written from the PC16550D datasheet (National Semiconductor / TI), whose
section names each test gives."""

from __future__ import annotations

import pytest

from dispatcher import IrqRecorder, Router
from examples.uart import Uart16550
from transports.testing import FakePartition, FakeVP

pytestmark = pytest.mark.anyio

COM1 = 0x3F8
RBR = THR = DLL = COM1
IER = DLM = COM1 + 1
IIR = FCR = COM1 + 2
LCR, MCR, LSR, MSR, SCR = COM1 + 3, COM1 + 4, COM1 + 5, COM1 + 6, COM1 + 7
IRQ = 4
OUT2, LOOP = 0x08, 0x10


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Host:
    def __init__(self) -> None:
        self.sent = bytearray()
        self.incoming = bytearray()
        self.clock = Clock()
        self.irqs = IrqRecorder()

    def source(self) -> bytes:
        data, self.incoming[:] = bytes(self.incoming), b""
        return data


@pytest.fixture
def host() -> Host:
    return Host()


@pytest.fixture
def uart(host: Host) -> Uart16550:
    return Uart16550(host.sent.extend, irq=host.irqs.line(IRQ), source=host.source, clock=host.clock)


@pytest.fixture
def router(uart: Uart16550) -> Router:
    router = Router()
    router.include(uart)
    return router


async def read_all(vp: FakeVP) -> bytes:
    data = bytearray()
    while await vp.inb(LSR) & 0x01:
        data.append(await vp.inb(RBR))
    return bytes(data)


async def test_reset_values(fake_vp: FakeVP, host: Host) -> None:
    """PC16550D datasheet, UART Reset Configuration table: IER, LCR, MCR 0; IIR 0x01; LSR 0x60 (THRE, TEMT);
    MSR deltas 0 with bits 4-7 the modem inputs (here CTS, DSR, DCD asserted); no interrupt."""
    assert await fake_vp.inb(IER) == 0
    assert await fake_vp.inb(IIR) == 0x01
    assert await fake_vp.inb(LCR) == 0
    assert await fake_vp.inb(MCR) == 0
    assert await fake_vp.inb(LSR) == 0x60
    assert await fake_vp.inb(MSR) == 0xB0
    assert not host.irqs.level(IRQ)


async def test_divisor_latch_and_dlab(fake_vp: FakeVP, uart: Uart16550) -> None:
    """PC16550D datasheet, Programmable Baud Generator and Line Control Register (DLAB): with LCR bit 7 set,
    offsets 0 and 1 are the divisor latch; cleared, they are RBR/THR and IER again."""
    await fake_vp.outb(LCR, 0x83)
    await fake_vp.outb(DLL, 0x01)
    await fake_vp.outb(DLM, 0x02)
    assert await fake_vp.inb(DLL) == 0x01 and await fake_vp.inb(DLM) == 0x02
    await fake_vp.outw(DLL, 0x0C00)  # one 16-bit OUT: DLL, then DLM
    assert uart.divisor == 0x0C00
    assert await fake_vp.inw(DLL) == 0x0C00
    await fake_vp.outb(LCR, 0x03)
    assert await fake_vp.inb(LCR) == 0x03
    assert await fake_vp.inb(IER) == 0
    await fake_vp.outb(IER, 0xFF)
    assert await fake_vp.inb(IER) == 0x0F  # bits 4-7 are always 0
    assert uart.divisor == 0x0C00


async def test_transmit_goes_to_the_sink(fake_vp: FakeVP, host: Host) -> None:
    """PC16550D datasheet, Transmitter Holding Register: a byte written to THR is transmitted; here at once,
    so LSR keeps THRE and TEMT set."""
    for byte in b"ok\n":
        assert await fake_vp.inb(LSR) & 0x60 == 0x60
        await fake_vp.outb(THR, byte)
    assert bytes(host.sent) == b"ok\n"


async def test_scratch_register(fake_vp: FakeVP) -> None:
    """PC16550D datasheet, Scratchpad Register: eight bits of storage with no effect on the UART."""
    await fake_vp.outb(SCR, 0xA5)
    assert await fake_vp.inb(SCR) == 0xA5


async def test_fifo_enable_and_iir_fifo_bits(fake_vp: FakeVP, host: Host) -> None:
    """PC16550D datasheet, FIFO Control Register and Interrupt Identification Register bits 6-7: FCR0 enables
    the FIFOs and IIR reads 0xC1; other FCR bits are ignored unless FCR0 is written as 1."""
    await fake_vp.outb(FCR, 0x01)
    assert await fake_vp.inb(IIR) == 0xC1
    host.incoming.extend(b"ab")
    assert await fake_vp.inb(LSR) == 0x61
    await fake_vp.outb(FCR, 0x02)  # RCVR reset without FCR0: the FIFOs go off, which empties them
    assert await fake_vp.inb(LSR) == 0x60
    assert await fake_vp.inb(IIR) == 0x01
    host.incoming.extend(b"xyz")
    assert await fake_vp.inb(LSR) & 0x01
    assert await fake_vp.inb(RBR) == ord("x")


async def test_receive_fifo_holds_16_and_host_bytes_wait(fake_vp: FakeVP, uart: Uart16550) -> None:
    """PC16550D datasheet, FIFO Polled Mode Operation: the receiver FIFO holds 16 characters. Host input is
    flow-controlled: the 17th waits on the line instead of overrunning."""
    await fake_vp.outb(FCR, 0x07)
    uart.receive(bytes(range(0x41, 0x41 + 20)))
    assert len(uart.rx) == 16
    assert await fake_vp.inb(LSR) == 0x61
    assert await read_all(fake_vp) == bytes(range(0x41, 0x41 + 20))
    assert await fake_vp.inb(LSR) == 0x60


async def test_fifo_reset_bits_clear_the_receiver(fake_vp: FakeVP, uart: Uart16550) -> None:
    """PC16550D datasheet, FIFO Control Register bit 1 (RCVR FIFO Reset): the FIFO is emptied; the bit clears
    itself (FCR reads as IIR, and the bits do not stick)."""
    await fake_vp.outb(FCR, 0x01)
    await fake_vp.outb(MCR, LOOP)
    for byte in b"abc":
        await fake_vp.outb(THR, byte)
    await fake_vp.outb(FCR, 0x03)
    assert not await fake_vp.inb(LSR) & 0x01
    assert uart.fcr == 0x01


async def test_loopback_echoes_and_maps_modem_lines(fake_vp: FakeVP, host: Host) -> None:
    """PC16550D datasheet, Modem Control Register bit 4 (Loop): transmitted bytes are received, nothing goes
    out, and DTR, RTS, OUT1, OUT2 appear as DSR, CTS, RI, DCD."""
    await fake_vp.outb(FCR, 0x07)
    await fake_vp.outb(MCR, LOOP | 0x0F)
    assert await fake_vp.inb(MSR) & 0xF0 == 0xF0
    for byte in b"ping":
        await fake_vp.outb(THR, byte)
    assert await read_all(fake_vp) == b"ping"
    assert host.sent == b""
    await fake_vp.outb(MCR, LOOP | 0x01)  # DTR only
    assert await fake_vp.inb(MSR) & 0xF0 == 0x20


async def test_overrun_with_fifo_loses_the_new_character(fake_vp: FakeVP) -> None:
    """PC16550D datasheet, Line Status Register bit 1 (OE), FIFO mode: when the FIFO is full the next
    character is lost and OE is set; reading LSR clears OE."""
    await fake_vp.outb(FCR, 0x07)
    await fake_vp.outb(MCR, LOOP)
    for byte in range(17):
        await fake_vp.outb(THR, byte)
    assert await fake_vp.inb(LSR) == 0x63
    assert await fake_vp.inb(LSR) == 0x61
    assert await read_all(fake_vp) == bytes(range(16))


async def test_overrun_without_fifo_overwrites_rbr(fake_vp: FakeVP) -> None:
    """PC16550D datasheet, Line Status Register bit 1 (OE), 16450 mode: a new character overwrites RBR."""
    await fake_vp.outb(MCR, LOOP)
    await fake_vp.outb(THR, 1)
    await fake_vp.outb(THR, 2)
    assert await fake_vp.inb(LSR) == 0x63
    assert await fake_vp.inb(RBR) == 2
    assert await fake_vp.inb(LSR) == 0x60


async def test_error_bits_show_with_their_character(fake_vp: FakeVP, uart: Uart16550) -> None:
    """PC16550D datasheet, Line Status Register bits 2-4 and 7: PE, FE and BI belong to the character at the
    top of the FIFO; LSR7 is set while an erroneous character is in the FIFO; reading LSR clears bits 1-4."""
    await fake_vp.outb(FCR, 0x01)
    uart.receive(b"a")
    uart.receive_error(ord("b"), parity=True)
    uart.receive_break()
    assert await fake_vp.inb(LSR) == 0xE1  # 'a' at the top: no error yet, but errors are in the FIFO
    assert await fake_vp.inb(RBR) == ord("a")
    assert await fake_vp.inb(LSR) == 0xE5  # PE for 'b'
    assert await fake_vp.inb(LSR) == 0xE1  # cleared by the read
    assert await fake_vp.inb(RBR) == ord("b")
    assert await fake_vp.inb(LSR) == 0xF9  # break: BI and FE with a zero character
    assert await fake_vp.inb(RBR) == 0
    assert await fake_vp.inb(LSR) == 0x60


async def test_error_fifo_bit_is_zero_in_16450_mode(fake_vp: FakeVP, uart: Uart16550) -> None:
    """PC16550D datasheet, Line Status Register bit 7: in the 16450 mode it is 0."""
    uart.receive_error(0x55, framing=True)
    assert await fake_vp.inb(LSR) == 0x69
    assert await fake_vp.inb(RBR) == 0x55


async def test_received_data_interrupt_at_trigger_level(fake_vp: FakeVP, uart: Uart16550, host: Host) -> None:
    """PC16550D datasheet, FIFO Interrupt Mode Operation and FCR bits 6-7: the received data interrupt (IIR
    0x04) is raised when the FIFO reaches the trigger level (here 4) and cleared when it drops below it; IRQ
    reaches the line only with MCR OUT2 set."""
    await fake_vp.outb(FCR, 0x41)
    await fake_vp.outb(IER, 0x01)
    uart.receive(b"abc")
    assert await fake_vp.inb(IIR) == 0xC1
    uart.receive(b"d")
    assert await fake_vp.inb(IIR) == 0xC4
    assert not host.irqs.level(IRQ)
    await fake_vp.outb(MCR, OUT2)
    assert host.irqs.level(IRQ)
    assert await fake_vp.inb(RBR) == ord("a")
    assert await fake_vp.inb(IIR) == 0xC1
    assert not host.irqs.level(IRQ)


@pytest.mark.parametrize(("fcr", "level"), [(0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)])
async def test_trigger_levels(fcr: int, level: int, fake_vp: FakeVP, uart: Uart16550) -> None:
    """PC16550D datasheet, FIFO Control Register bits 6-7: trigger levels 1, 4, 8 and 14 bytes."""
    await fake_vp.outb(FCR, fcr)
    await fake_vp.outb(IER, 0x01)
    uart.receive(bytes(level - 1))
    assert await fake_vp.inb(IIR) == 0xC1
    uart.receive(b"\0")
    assert await fake_vp.inb(IIR) == 0xC4


async def test_character_timeout(fake_vp: FakeVP, uart: Uart16550, host: Host) -> None:
    """PC16550D datasheet, FIFO Interrupt Mode Operation (character timeout, IIR 0x0C): bytes below the
    trigger level, none received or read for four character times, interrupt; reading RBR clears it. At
    9600 baud 8N1 a character is 10 bits, 1/960 s."""
    await fake_vp.outb(LCR, 0x83)
    await fake_vp.outw(DLL, 12)
    await fake_vp.outb(LCR, 0x03)
    await fake_vp.outb(FCR, 0xC1)
    await fake_vp.outb(IER, 0x01)
    await fake_vp.outb(MCR, OUT2)
    uart.receive(b"hi")
    assert uart.char_time() == pytest.approx(1 / 960)
    due = uart.next_due()
    assert due == pytest.approx(host.clock.now + 4 / 960)
    host.clock.now += 3.9 / 960
    uart.poll()
    assert not host.irqs.level(IRQ)
    assert await fake_vp.inb(IIR) == 0xC1
    host.clock.now += 0.2 / 960
    uart.poll()
    assert host.irqs.level(IRQ)
    assert await fake_vp.inb(IIR) == 0xCC
    assert await fake_vp.inb(RBR) == ord("h")
    assert await fake_vp.inb(IIR) == 0xC1  # the read restarts the timer
    assert not host.irqs.level(IRQ)
    host.clock.now += 5 / 960
    assert await fake_vp.inb(IIR) == 0xCC
    assert await fake_vp.inb(RBR) == ord("i")
    assert await fake_vp.inb(IIR) == 0xC1
    assert uart.next_due() is None


async def test_thre_interrupt(fake_vp: FakeVP, host: Host) -> None:
    """PC16550D datasheet, Interrupt Identification Register (THRE, IIR 0x02): enabling ETBEI with THR empty
    interrupts; reading IIR (when THRE is the source) or writing THR clears it; the transmitter empties again
    at once here, so each write is followed by a new interrupt, a new edge on the line."""
    await fake_vp.outb(MCR, OUT2)
    await fake_vp.outb(IER, 0x02)
    assert host.irqs.level(IRQ)
    assert await fake_vp.inb(IIR) == 0x02
    assert not host.irqs.level(IRQ)
    assert await fake_vp.inb(IIR) == 0x01
    edges = host.irqs.rising_edges(IRQ)
    await fake_vp.outb(THR, ord("x"))
    assert host.irqs.rising_edges(IRQ) == edges + 1
    assert await fake_vp.inb(IIR) == 0x02


async def test_modem_status_interrupt_and_deltas(fake_vp: FakeVP, uart: Uart16550, host: Host) -> None:
    """PC16550D datasheet, Modem Status Register: DCTS, DDSR and DDCD flag changes, TERI the trailing edge of
    RI; with EDSSI they interrupt (IIR 0x00); reading MSR clears the deltas."""
    await fake_vp.outb(MCR, OUT2)
    await fake_vp.outb(IER, 0x08)
    uart.set_modem_inputs(cts=False, dsr=True, ri=True, dcd=True)
    assert host.irqs.level(IRQ)
    assert await fake_vp.inb(IIR) == 0x00
    assert await fake_vp.inb(MSR) == 0xE1  # DCTS; DSR, RI, DCD
    assert not host.irqs.level(IRQ)
    uart.set_modem_inputs(cts=False, dsr=True, ri=False, dcd=False)
    assert await fake_vp.inb(MSR) == 0x2C  # TERI, DDCD; DSR
    uart.set_modem_inputs(cts=False, dsr=True, ri=True, dcd=False)
    assert await fake_vp.inb(MSR) == 0x60  # RI's leading edge sets no delta
    assert await fake_vp.inb(IIR) == 0x01


async def test_interrupt_priorities(fake_vp: FakeVP, uart: Uart16550, host: Host) -> None:
    """PC16550D datasheet, Interrupt Identification Register priorities: receiver line status (0x06) over
    received data (0x04) over THR empty (0x02) over modem status (0x00); each is reported until its own
    clearing action."""
    await fake_vp.outb(FCR, 0x01)
    await fake_vp.outb(MCR, OUT2)
    uart.set_modem_inputs(cts=False)
    uart.receive_error(0x41, parity=True)
    await fake_vp.outb(IER, 0x0F)
    assert await fake_vp.inb(IIR) == 0xC6
    assert await fake_vp.inb(LSR) & 0x04
    assert await fake_vp.inb(IIR) == 0xC4
    assert await fake_vp.inb(RBR) == 0x41
    assert await fake_vp.inb(IIR) == 0xC2  # reading it here clears THRE
    assert await fake_vp.inb(IIR) == 0xC0
    assert await fake_vp.inb(MSR) & 0x01
    assert await fake_vp.inb(IIR) == 0xC1
    assert not host.irqs.level(IRQ)


async def test_loopback_gates_the_interrupt_off_the_bus(fake_vp: FakeVP, host: Host) -> None:
    """PC16550D datasheet, Modem Control Register bit 3 (OUT2) and Loop: PC boards route INTR through OUT2,
    which loopback forces inactive; the interrupt still shows in IIR."""
    await fake_vp.outb(MCR, OUT2 | LOOP)
    await fake_vp.outb(IER, 0x02)
    assert not host.irqs.level(IRQ)
    assert await fake_vp.inb(IIR) == 0x02


async def test_source_is_polled_when_the_guest_looks(fake_vp: FakeVP, host: Host) -> None:
    """Input from the user's source arrives when the guest reads LSR, IIR or RBR, or when poll() runs."""
    await fake_vp.outb(MCR, OUT2)
    await fake_vp.outb(IER, 0x01)
    host.incoming.extend(b"k")
    assert await fake_vp.inb(IIR) == 0x04
    assert host.irqs.level(IRQ)
    assert await fake_vp.inb(RBR) == ord("k")
    assert not host.irqs.level(IRQ)


async def test_poll_raises_the_line_without_an_access(uart: Uart16550, host: Host) -> None:
    """A machine loop's poll() pulls the source and raises the interrupt with no guest access."""
    uart.mcr, uart.ier = OUT2, 0x01
    host.incoming.extend(b"z")
    uart.poll()
    assert host.irqs.level(IRQ)


async def test_wider_accesses_arrive_as_bytes(fake_vp: FakeVP, host: Host) -> None:
    """PC16550D datasheet, Pin Description (D7-D0, an 8-bit bus): a 16-bit read of LSR returns LSR and MSR;
    a 32-bit write at the base writes THR, IER, FCR and LCR in turn; one at SCR reaches unclaimed ports."""
    assert await fake_vp.inw(LSR) == 0xB060
    await fake_vp.outl(COM1, 0x03C1_0000 | ord("A"))  # THR 'A', IER 0, FCR 0xC1 (FIFOs, trigger 14), LCR 3
    assert host.sent == b"A"
    assert await fake_vp.inb(LCR) == 0x03
    assert await fake_vp.inb(IIR) == 0xC1
    await fake_vp.outb(SCR, 0x11)
    assert await fake_vp.inl(SCR) == 0xFFFF_FF11


async def test_configurable_base_and_irq() -> None:
    """COM2 at 0x2F8 on IRQ 3: the device answers only there."""
    irqs = IrqRecorder()
    router = Router()
    router.include(Uart16550(io_base=0x2F8, irq=irqs.line(3)))
    async with FakePartition(router) as partition:
        vp = partition.vp(0)
        await vp.outb(0x2FC, OUT2)
        await vp.outb(0x2F9, 0x02)
        assert irqs.level(3)
        assert await vp.inb(0x3FD) == 0xFF
