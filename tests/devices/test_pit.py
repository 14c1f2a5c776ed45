"""The i8254 PIT at 0x40-0x43 and port 0x61, written from the Intel 82C54 datasheet (section names in each
test) and the 82371AB PIIX4 datasheet for port 0x61. Time comes from a fake clock set to exact input
clock ticks: nothing sleeps."""

from __future__ import annotations

import pytest

from dispatcher import IrqRecorder, Router
from examples.pit import PIT_HZ, Pit8254, SystemControlB
from transports.testing import FakePartition, FakeVP

pytestmark = pytest.mark.anyio

CH0, CH1, CH2, MODE, PORT_B = 0x40, 0x41, 0x42, 0x43, 0x61


class Clock:
    """A monotonic clock the test sets to the middle of a given 1.193182 MHz tick."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def at(self, tick: int) -> None:
        self.now = (tick + 0.5) / PIT_HZ


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def irqs() -> IrqRecorder:
    return IrqRecorder()


@pytest.fixture
def pit(clock: Clock, irqs: IrqRecorder) -> Pit8254:
    return Pit8254(irq=irqs.line(0), clock=clock)


@pytest.fixture
def router(pit: Pit8254) -> Router:
    router = Router()
    router.include(pit)
    router.include(SystemControlB(pit))
    return router


async def program(vp: FakeVP, channel: int, mode: int, count: int, *, bcd: bool = False) -> None:
    """Control word with LSB-then-MSB access, then the two count bytes."""
    await vp.outb(MODE, channel << 6 | 0x30 | mode << 1 | int(bcd))
    await vp.outb(CH0 + channel, count & 0xFF)
    await vp.outb(CH0 + channel, count >> 8 & 0xFF)


async def status(vp: FakeVP, channel: int) -> int:
    await vp.outb(MODE, 0xE0 | 2 << channel)  # read-back: status only
    return await vp.inb(CH0 + channel)


async def latched(vp: FakeVP, channel: int) -> int:
    await vp.outb(MODE, channel << 6)  # counter latch command
    return await vp.inb(CH0 + channel) | await vp.inb(CH0 + channel) << 8


async def out2(vp: FakeVP) -> bool:
    return bool(await vp.inb(PORT_B) & 0x20)


async def test_power_up_state(fake_vp: FakeVP, clock: Clock, irqs: IrqRecorder) -> None:
    """82C54 datasheet, Read-Back Command (Status Byte): after power-up this model runs every counter in
    mode 3, LSB-then-MSB, binary, count 65536 (the datasheet leaves it undefined; QEMU does the same), so
    channel 0 already gives IRQ 0 edges at 18.2 Hz."""
    clock.at(10)
    assert await status(fake_vp, 0) == 0xB6
    assert await status(fake_vp, 1) == 0xB6
    edges = irqs.rising_edges(0)
    clock.at(1 + 0x8000)
    assert await status(fake_vp, 0) == 0x36  # second half of the square wave
    clock.at(1 + 0x10000)
    assert await status(fake_vp, 0) == 0xB6
    assert irqs.rising_edges(0) == edges + 1


async def test_control_word_sets_status_and_null_count(fake_vp: FakeVP, clock: Clock) -> None:
    """82C54 datasheet, Control Word Format and Status Byte: RW, mode and BCD read back; NULL COUNT is set
    by the control word and a count write, and clears once the count is loaded (on the next CLK)."""
    clock.at(100)
    await fake_vp.outb(MODE, 0x94)  # channel 2, LSB only, mode 2, binary
    assert await status(fake_vp, 2) == 0xD4
    await fake_vp.outb(MODE, 0x80 | 0x1B)  # channel 2, LSB only, mode 5, BCD
    assert await status(fake_vp, 2) & 0x7F == 0x5B


async def test_mode0_interrupt_on_terminal_count(
    fake_vp: FakeVP, clock: Clock, pit: Pit8254, irqs: IrqRecorder
) -> None:
    """82C54 datasheet, Mode 0 (Interrupt on Terminal Count): OUT goes low with the control word, the count
    is loaded on the next CLK and decremented after that; OUT goes high N+1 CLKs after the count is written
    and stays high; the counter wraps past 0 and keeps counting."""
    clock.at(1000)
    await program(fake_vp, 0, 0, 100)
    assert not irqs.level(0)
    assert await status(fake_vp, 0) & 0xC0 == 0x40  # OUT low, null count
    clock.at(1001)
    assert await latched(fake_vp, 0) == 100
    assert await status(fake_vp, 0) & 0xC0 == 0
    clock.at(1051)
    assert await latched(fake_vp, 0) == 50
    clock.at(1100)
    assert await latched(fake_vp, 0) == 1
    assert not irqs.level(0)
    clock.at(1101)
    pit.update()
    assert irqs.level(0)
    assert await latched(fake_vp, 0) == 0
    clock.at(1103)
    assert await latched(fake_vp, 0) == 0xFFFE
    assert irqs.level(0)
    edges = irqs.rising_edges(0)
    clock.at(1101 + 0x20000)
    assert pit.update() == 0
    assert irqs.rising_edges(0) == edges


async def test_mode0_first_byte_stops_counting(fake_vp: FakeVP, clock: Clock, irqs: IrqRecorder) -> None:
    """82C54 datasheet, Mode 0 and Write Operations: writing the first byte of a two-byte count stops the
    count and sets OUT low at once; the second byte starts the new count."""
    clock.at(0)
    await program(fake_vp, 0, 0, 10)
    clock.at(20)
    assert await status(fake_vp, 0) & 0x80
    assert irqs.level(0)
    await fake_vp.outb(CH0, 50)
    assert not await status(fake_vp, 0) & 0x80
    held = await latched(fake_vp, 0)
    clock.at(40)
    assert await latched(fake_vp, 0) == held
    await fake_vp.outb(CH0, 0)
    clock.at(90)  # written at tick 40: N + 1 = 51 CLKs later OUT rises
    assert not await status(fake_vp, 0) & 0x80
    clock.at(91)
    assert await status(fake_vp, 0) & 0x80


async def test_mode0_gate_suspends_counting(fake_vp: FakeVP, clock: Clock) -> None:
    """82C54 datasheet, Mode 0 and Gate Pin Operations Summary: GATE low disables counting; channel 2's GATE
    is port 0x61 bit 0."""
    await fake_vp.outb(PORT_B, 0x01)
    clock.at(0)
    await program(fake_vp, 2, 0, 1000)
    clock.at(101)
    assert await latched(fake_vp, 2) == 900
    await fake_vp.outb(PORT_B, 0x00)
    clock.at(501)
    assert await latched(fake_vp, 2) == 900
    await fake_vp.outb(PORT_B, 0x01)
    clock.at(601)
    assert await latched(fake_vp, 2) == 800


async def test_mode1_retriggerable_one_shot(fake_vp: FakeVP, clock: Clock) -> None:
    """82C54 datasheet, Mode 1 (Hardware Retriggerable One-Shot): OUT is high until a GATE rising edge;
    it goes low on the next CLK and high again N CLKs later; a new trigger restarts the count."""
    clock.at(0)
    await program(fake_vp, 2, 1, 30)
    clock.at(100)
    assert await out2(fake_vp)
    assert await status(fake_vp, 2) & 0x40  # null count until a trigger loads it
    await fake_vp.outb(PORT_B, 0x01)  # trigger at tick 100
    clock.at(101)
    assert not await out2(fake_vp)
    clock.at(120)
    await fake_vp.outb(PORT_B, 0x00)
    await fake_vp.outb(PORT_B, 0x01)  # retrigger at tick 120
    clock.at(131)
    assert not await out2(fake_vp)
    clock.at(150)
    assert not await out2(fake_vp)
    clock.at(151)
    assert await out2(fake_vp)


async def test_mode2_rate_generator(fake_vp: FakeVP, clock: Clock, pit: Pit8254, irqs: IrqRecorder) -> None:
    """82C54 datasheet, Mode 2 (Rate Generator): OUT is low for one CLK when the count reaches 1, then the
    count reloads: one rising edge every N CLKs; a new count takes effect at the end of the current period."""
    clock.at(0)
    await program(fake_vp, 0, 2, 1000)
    assert pit.next_due() == pytest.approx(1001 / PIT_HZ)
    clock.at(500)
    assert await latched(fake_vp, 0) == 501
    clock.at(1000)
    assert not await status(fake_vp, 0) & 0x80  # count is 1: OUT low
    edges = irqs.rising_edges(0)
    clock.at(1001)
    assert pit.update() == 1
    assert irqs.rising_edges(0) == edges + 1
    assert await latched(fake_vp, 0) == 1000
    clock.at(5001)
    assert pit.update() == 4
    assert irqs.rising_edges(0) == edges + 2  # four periods since the last look: one edge on the line
    clock.at(5101)
    await fake_vp.outb(CH0, 100)
    await fake_vp.outb(CH0, 0)
    assert await status(fake_vp, 0) & 0x40  # waiting for the end of the period
    clock.at(6000)
    assert await latched(fake_vp, 0) == 1  # the old period's last CLK
    clock.at(6001)
    assert await latched(fake_vp, 0) == 100
    assert pit.next_due() == pytest.approx(6101 / PIT_HZ)


async def test_next_due_wakes_exactly_on_the_edge(pit: Pit8254, clock: Clock, irqs: IrqRecorder) -> None:
    """A loop that sleeps until next_due() and updates there sees the edge, not a tick early."""
    pit.update()
    for _ in range(3):
        due = pit.next_due()
        assert due is not None
        clock.now = due
        assert pit.update() == 1
        assert irqs.level(0)


async def test_mode3_square_wave(fake_vp: FakeVP, clock: Clock) -> None:
    """82C54 datasheet, Mode 3 (Square Wave Mode): OUT is high for ceil(N/2) and low for floor(N/2) CLKs;
    each half cycle reloads the count and decrements it by two (an odd count by one, then by three)."""
    await fake_vp.outb(PORT_B, 0x01)
    clock.at(0)
    await program(fake_vp, 2, 3, 9)
    highs = []
    for tick in range(1, 19):
        clock.at(tick)
        highs.append(await out2(fake_vp))
    assert highs == [True] * 5 + [False] * 4 + [True] * 5 + [False] * 4
    counts = []
    for tick in range(19, 28):
        clock.at(tick)
        counts.append(await latched(fake_vp, 2))
    assert counts == [9, 8, 6, 4, 2, 9, 6, 4, 2]  # odd N: down by one, then three, else by two
    await program(fake_vp, 2, 3, 10)  # at tick 27: a control word, so loaded at once on the next CLK
    clock.at(28)
    assert await latched(fake_vp, 2) == 10
    clock.at(30)
    assert await latched(fake_vp, 2) == 6


async def test_mode3_new_count_at_the_end_of_the_half_cycle(fake_vp: FakeVP, clock: Clock) -> None:
    """82C54 datasheet, Mode 3: a new count written while counting is loaded at the end of the current half
    cycle; here the high half of 10 ends and the low half of the new count 4 follows."""
    await fake_vp.outb(PORT_B, 0x01)
    clock.at(0)
    await program(fake_vp, 2, 3, 10)
    levels = []
    for tick in range(1, 12):
        clock.at(tick)
        if tick == 3:
            await fake_vp.outb(CH2, 4)
            await fake_vp.outb(CH2, 0)
        levels.append(await out2(fake_vp))
    assert levels == [True] * 5 + [False] * 2 + [True] * 2 + [False] * 2


async def test_mode2_and_3_gate_low_forces_out_high_and_reloads(fake_vp: FakeVP, clock: Clock) -> None:
    """82C54 datasheet, Gate Pin Operations Summary: in modes 2 and 3 GATE low stops counting and sets OUT
    high; the rising edge reloads the count on the next CLK."""
    await fake_vp.outb(PORT_B, 0x01)
    clock.at(0)
    await program(fake_vp, 2, 3, 100)
    clock.at(70)
    assert not await out2(fake_vp)
    await fake_vp.outb(PORT_B, 0x00)
    assert await out2(fake_vp)
    await fake_vp.outb(PORT_B, 0x01)
    clock.at(71)
    assert await latched(fake_vp, 2) == 100


async def test_mode4_software_strobe(fake_vp: FakeVP, clock: Clock) -> None:
    """82C54 datasheet, Mode 4 (Software Triggered Strobe): OUT is high; it goes low for one CLK N+1 CLKs
    after the count is written."""
    await fake_vp.outb(PORT_B, 0x01)
    clock.at(0)
    await program(fake_vp, 2, 4, 5)
    levels = []
    for tick in range(1, 9):
        clock.at(tick)
        levels.append(await out2(fake_vp))
    assert levels == [True, True, True, True, True, False, True, True]


async def test_mode5_hardware_strobe(fake_vp: FakeVP, clock: Clock) -> None:
    """82C54 datasheet, Mode 5 (Hardware Triggered Strobe): counting starts on a GATE rising edge; OUT goes
    low for one CLK N+1 CLKs after the trigger."""
    clock.at(0)
    await program(fake_vp, 2, 5, 3)
    clock.at(50)
    assert await out2(fake_vp)
    await fake_vp.outb(PORT_B, 0x01)
    levels = []
    for tick in range(51, 56):
        clock.at(tick)
        levels.append(await out2(fake_vp))
    assert levels == [True, True, True, False, True]


async def test_modes_6_and_7_are_2_and_3(fake_vp: FakeVP, clock: Clock) -> None:
    """82C54 datasheet, Control Word Format: M2 is a don't-care for modes 2 and 3 (110 = mode 2, 111 = 3)."""
    await fake_vp.outb(PORT_B, 0x01)
    clock.at(0)
    await fake_vp.outb(MODE, 0x80 | 0x30 | 6 << 1)
    await fake_vp.outb(CH2, 4)
    await fake_vp.outb(CH2, 0)
    levels = []
    for tick in range(1, 9):
        clock.at(tick)
        levels.append(await out2(fake_vp))
    assert levels == [True, True, True, False] * 2


async def test_counter_latch_command(fake_vp: FakeVP, clock: Clock) -> None:
    """82C54 datasheet, Counter Latch Command: the count is latched until read (LSB then MSB); a second latch
    before the read is ignored; unlatched reads see the live count."""
    clock.at(0)
    await program(fake_vp, 1, 2, 0x1234)
    clock.at(0x11)
    await fake_vp.outb(MODE, 0x40)
    clock.at(0x21)
    await fake_vp.outb(MODE, 0x40)  # ignored
    assert await fake_vp.inb(CH1) == 0x24
    clock.at(0x31)
    assert await fake_vp.inb(CH1) == 0x12
    assert await fake_vp.inb(CH1) == 0x04  # live LSB: 0x1234 - 0x30
    assert await fake_vp.inb(CH1) == 0x12


async def test_lsb_only_and_msb_only_access(fake_vp: FakeVP, clock: Clock) -> None:
    """82C54 datasheet, Write Operations and Read Operations: RW=01 reads and writes the LSB only (MSB 0),
    RW=10 the MSB only (LSB 0)."""
    clock.at(0)
    await fake_vp.outb(MODE, 0x54)  # channel 1, LSB only, mode 2
    await fake_vp.outb(CH1, 0x80)
    clock.at(0x11)
    assert await fake_vp.inb(CH1) == 0x70
    assert await fake_vp.inb(CH1) == 0x70
    await fake_vp.outb(MODE, 0x64)  # channel 1, MSB only, mode 2
    await fake_vp.outb(CH1, 0x02)
    clock.at(0x12)
    assert await fake_vp.inb(CH1) == 0x02  # 0x0200
    clock.at(0x13)
    assert await fake_vp.inb(CH1) == 0x01  # 0x01FF


async def test_read_back_command(fake_vp: FakeVP, clock: Clock) -> None:
    """82C54 datasheet, Read-Back Command: 0xD2 (as SeaBIOS issues it) latches channel 0's count; with both
    COUNT and STATUS latched the status byte is read first; several counters can be latched at once."""
    clock.at(0)
    await program(fake_vp, 0, 2, 0)  # 65536, SeaBIOS's setting
    await program(fake_vp, 1, 2, 0x200)
    clock.at(0x101)
    await fake_vp.outb(MODE, 0xD2)
    clock.at(0x201)
    assert await fake_vp.inb(CH0) | await fake_vp.inb(CH0) << 8 == 0x10000 - 0x100
    await fake_vp.outb(MODE, 0xC6)  # count and status of channels 0 and 1
    assert await fake_vp.inb(CH1) == 0xB4
    assert await fake_vp.inb(CH1) | await fake_vp.inb(CH1) << 8 == 0x200
    assert await fake_vp.inb(CH0) == 0xB4
    assert await fake_vp.inb(CH0) | await fake_vp.inb(CH0) << 8 == 0x10000 - 0x200


async def test_bcd_counting(fake_vp: FakeVP, clock: Clock) -> None:
    """82C54 datasheet, Control Word Format (BCD): the count is four decades; 0 means 10000."""
    await fake_vp.outb(PORT_B, 0x01)
    clock.at(0)
    await program(fake_vp, 2, 0, 0x0100, bcd=True)
    clock.at(2)
    assert await latched(fake_vp, 2) == 0x0099
    await program(fake_vp, 2, 2, 0x0000, bcd=True)
    clock.at(4)
    assert await latched(fake_vp, 2) == 0x9999


async def test_port_b_bits(fake_vp: FakeVP, clock: Clock) -> None:
    """82371AB PIIX4 datasheet, NMI Status and Control Register (port 61h): bits 0-3 read back as written,
    bit 4 toggles with each refresh (15.085 us = 18 ticks), bit 5 is OUT2, bits 6-7 read 0."""
    clock.at(0)
    await fake_vp.outb(PORT_B, 0xFF)
    assert await fake_vp.inb(PORT_B) & 0xCF == 0x0F
    clock.at(18)
    first = await fake_vp.inb(PORT_B) & 0x10
    clock.at(36)
    assert await fake_vp.inb(PORT_B) & 0x10 != first
    await program(fake_vp, 2, 0, 0x4000)  # SeaBIOS's TSC calibration: wait for OUT2
    assert not await out2(fake_vp)
    clock.at(36 + 0x4001)
    assert await out2(fake_vp)


async def test_speaker_follows_out2_and_the_data_bit(fake_vp: FakeVP, pit: Pit8254, clock: Clock) -> None:
    """PC speaker wiring: the speaker sees OUT2 gated by port 0x61 bit 1."""
    port_b = SystemControlB(pit)
    await fake_vp.outb(PORT_B, 0x01)
    assert not port_b.speaker
    port_b.value = 0x03
    clock.at(5)
    assert port_b.speaker == pit.out(2)


async def test_port_widths(fake_vp: FakeVP, clock: Clock) -> None:
    """82C54 datasheet, Pin Description (D7-D0, 8 bits; A1, A0 = 11 with RD is a no-op, the bus floats):
    a read of 0x43 answers 0xFF; a 16-bit read of 0x40 reads channel 0 then channel 1; a 16-bit read of 0x42
    reaches the floating 0x43."""
    clock.at(0)
    assert await fake_vp.inb(MODE) == 0xFF
    await fake_vp.outb(MODE, 0x10)  # channel 0, LSB only, mode 0
    await fake_vp.outb(CH0, 0x40)
    await fake_vp.outb(MODE, 0x50)  # channel 1, LSB only, mode 0
    await fake_vp.outb(CH1, 0x80)
    clock.at(0x11)
    assert await fake_vp.inw(CH0) == 0x7030
    assert await fake_vp.inw(CH2) >> 8 == 0xFF
    await fake_vp.outw(CH0, 0x2010)  # LSB 0x10 to channel 0, 0x20 to channel 1
    clock.at(0x12)
    assert await fake_vp.inw(CH0) == 0x2010


async def test_configurable_base_and_irq(clock: Clock) -> None:
    """The PIT answers at its io_base; channel 0 drives the line it is given."""
    irqs = IrqRecorder()
    pit = Pit8254(io_base=0x140, irq=irqs.line(2), clock=clock)
    router = Router()
    router.include(pit)
    async with FakePartition(router) as partition:
        vp = partition.vp(0)
        clock.at(0)
        await vp.outb(0x143, 0x30)
        await vp.outb(0x140, 2)
        await vp.outb(0x140, 0)
        clock.at(3)
        pit.update()
        assert irqs.level(2)
        assert await vp.inb(0x43) == 0xFF
