"""Interrupt interception in tests: every change of every line, stamped with virtual time, and waiting for an
edge by moving the virtual clock (qtest's irq_intercept_in, for device models)."""

from __future__ import annotations

import pytest

from dispatcher import IrqEvent, IrqLine, IrqRecorder, Router
from dispatcher.clock import NS_PER_SECOND, VirtualClock
from dispatcher.errors import DispatchError
from dispatcher.irq import IrqWaitTimeout
from examples.pc_devices import build_pc
from examples.pit import PIT_HZ
from examples.uart import Uart16550
from transports.testing import FakePartition, FakeVP

THR, IER, IIR, FCR, LCR, MCR = 0x3F8, 0x3F9, 0x3FA, 0x3FA, 0x3FB, 0x3FC


def test_a_recorder_without_a_clock_keeps_untimed_events() -> None:
    irqs = IrqRecorder()
    line = irqs.line(4)
    line.pulse()
    line.raise_()
    assert irqs.events == [IrqEvent(4, True), IrqEvent(4, False), IrqEvent(4, True)]
    assert irqs.level(4) and irqs.level(line) and not irqs.level(5)
    assert irqs.rising_edges(line) == 2
    assert irqs.edges(4) == [0, 0] and irqs.edges(4, rising=False) == [0]


def test_events_carry_the_clocks_time() -> None:
    clock = VirtualClock(start_ns=10)
    irqs = IrqRecorder(clock)
    line = irqs.line(3)
    line.raise_()
    clock.advance(90)
    line.lower()
    assert irqs.events == [IrqEvent(3, True, 10), IrqEvent(3, False, 100)]
    seconds = IrqRecorder(lambda: 2.5)  # any clock giving seconds
    seconds.line(1).raise_()
    assert seconds.events == [IrqEvent(1, True, 2_500_000_000)]


def test_clear_forgets_events_but_not_levels() -> None:
    irqs = IrqRecorder()
    irqs.line(7).raise_()
    irqs.clear()
    assert irqs.events == [] and irqs.level(7)


def test_tap_records_and_still_forwards() -> None:
    pic = IrqRecorder()  # stands for whatever receives the line
    line = IrqLine(pic, 8, "RTC")
    line.raise_()
    clock = VirtualClock(start_ns=5)
    irqs = IrqRecorder(clock)
    assert irqs.tap(line) is line
    assert irqs.level(8)  # the level at the time of tapping
    line.lower()
    clock.advance(5)
    line.raise_()
    assert irqs.events == [IrqEvent(8, False, 5), IrqEvent(8, True, 10)]
    assert pic.events == [IrqEvent(8, True), IrqEvent(8, False), IrqEvent(8, True)]
    irqs.untap(line)
    line.lower()
    assert len(irqs.events) == 2 and len(pic.events) == 4
    with pytest.raises(ValueError, match="RTC is not tapped by this recorder"):
        irqs.untap(line)


def test_assert_edge_names_what_it_found() -> None:
    clock = VirtualClock()
    irqs = IrqRecorder(clock)
    line = irqs.line(0, "PIT")
    for _ in range(12):
        clock.advance(100)
        line.pulse()
    assert irqs.assert_edge(line) == 100
    assert irqs.assert_edge(0, at_ns=300) == 300
    assert irqs.assert_edge(0, rising=False, at_ns=1190, within_ns=10) == 1200
    with pytest.raises(AssertionError, match=r"^PIT: no rising edge at 350 ns \(\+/- 10 ns\); rising edges at "):
        irqs.assert_edge(0, at_ns=350, within_ns=10)
    with pytest.raises(AssertionError, match=r"edges at \[100, 200, .*, 1000, \.\.\.\] ns$"):
        irqs.assert_edge(0, at_ns=350)
    with pytest.raises(AssertionError, match=r"^IRQ5: no falling edge; it had none$"):
        irqs.assert_edge(5, rising=False)


def test_wait_for_edge_steps_the_clock_to_the_edge() -> None:
    clock = VirtualClock()
    irqs = IrqRecorder(clock)
    line = irqs.line(1)
    ran: list[int] = []
    clock.call_at(100, lambda: ran.append(clock.now_ns))
    clock.call_at(250, line.raise_)
    clock.call_at(250, lambda: ran.append(clock.now_ns))  # due at the same instant: runs too
    clock.call_at(400, line.lower)
    assert irqs.wait_for_edge(line, limit_ns=1000) == 250
    assert clock.now_ns == 250 and ran == [100, 250]
    assert irqs.wait_for_edge(line, rising=False, limit_ns=1000) == 400


def test_wait_for_edge_gives_up_at_its_limit() -> None:
    clock = VirtualClock()
    irqs = IrqRecorder(clock)
    line = irqs.line(2, "IRQ2")
    line.raise_()  # an edge before the wait does not count
    clock.call_at(5000, line.lower)
    with pytest.raises(IrqWaitTimeout, match=r"^IRQ2: no rising edge from 0 to 1000 ns \(limit_ns=1000\); ") as caught:
        irqs.wait_for_edge(2, limit_ns=1000)
    assert "the clock's next deadline is 5000 ns" in str(caught.value)
    assert isinstance(caught.value, DispatchError) and isinstance(caught.value, AssertionError)
    assert clock.now_ns == 1000
    assert irqs.wait_for_edge(2, rising=False, limit_ns=10_000) == 5000
    with pytest.raises(IrqWaitTimeout, match=r"nothing is due"):
        irqs.wait_for_edge(2, limit_ns=10_000)
    assert clock.now_ns == 15_000
    with pytest.raises(TypeError, match="wait_for_edge needs a VirtualClock"):
        IrqRecorder().wait_for_edge(2, limit_ns=1)


# -- devices, driven by guest code through a fake VP ------------------------------------------------


@pytest.fixture
def irqs(virtual_clock: VirtualClock) -> IrqRecorder:
    return IrqRecorder(virtual_clock)


@pytest.fixture
def uart(virtual_clock: VirtualClock, irqs: IrqRecorder) -> Uart16550:
    return Uart16550(irq=irqs.line(4, "COM1"), clock=virtual_clock)


@pytest.fixture
def router(uart: Uart16550) -> Router:
    router = Router()
    router.include(uart)
    return router


@pytest.mark.anyio
async def test_uart_thre_interrupt_rises_at_the_enabling_write(
    fake_vp: FakeVP, virtual_clock: VirtualClock, irqs: IrqRecorder
) -> None:
    """PC16550D datasheet, IER bit 1 and IIR: enabling the THRE interrupt with THR empty interrupts at once;
    reading IIR (reporting THRE) or writing THR clears it; the byte leaves at once, so THRE comes back."""
    await fake_vp.outb(MCR, 0x08)  # OUT2: the PC gates the UART's interrupt with it
    virtual_clock.advance(5_000)
    await fake_vp.outb(IER, 0x02)
    assert irqs.assert_edge(4, at_ns=5_000) == 5_000
    virtual_clock.advance(1_000)
    assert await fake_vp.inb(IIR) & 0x0F == 0x02
    irqs.assert_edge(4, rising=False, at_ns=6_000)
    virtual_clock.advance(1_000)
    await fake_vp.outb(THR, 0x41)
    assert irqs.edges(4) == [5_000, 7_000] and irqs.level(4)


@pytest.mark.anyio
async def test_uart_character_timeout_after_four_character_times(
    fake_vp: FakeVP, virtual_clock: VirtualClock, uart: Uart16550, irqs: IrqRecorder
) -> None:
    """PC16550D datasheet, FIFO interrupt mode: with fewer characters than the trigger level in the receive
    FIFO, a timeout interrupt comes when nothing moved in or out of it for four character times."""
    virtual_clock.watch(uart)
    await fake_vp.outb(MCR, 0x08)
    await fake_vp.outb(LCR, 0x03)  # 8N1 at the reset divisor, 9600 baud: 10 bits a character
    await fake_vp.outb(FCR, 0xC1)  # FIFOs on, trigger level 14
    await fake_vp.outb(IER, 0x01)  # received data interrupts
    virtual_clock.advance(1_000_000)
    uart.receive(b"hi")  # a character time is 10 * 16 * 12 / 1.8432 MHz, 1.0417 ms
    assert not irqs.level(4)  # two characters, trigger level 14: no data interrupt
    arrived = virtual_clock.now_ns
    when = irqs.wait_for_edge(4, limit_ns=10_000_000)
    assert when == arrived + 4 * 10 * 16 * 12 * NS_PER_SECOND // 1_843_200 + 1  # 4.1667 ms, rounded up
    assert await fake_vp.inb(IIR) & 0x0F == 0x0C  # character timeout


@pytest.mark.anyio
async def test_pit_irq0_period_through_a_pc() -> None:
    """A guest programs PIT channel 0 for mode 2 with a count of 1193 (about 1 kHz); IRQ 0 rises every 1193
    input clocks, to the nanosecond, and reaches the PIC."""
    clock = VirtualClock()
    pc = build_pc(clock=clock)
    irqs = IrqRecorder(clock)
    irqs.tap(pc.pit.irq)
    clock.watch(pc)
    async with FakePartition(pc.router, clock=clock) as partition:
        vp = partition.vp(0)
        partition.advance(123_456)
        start = pc.pit.tick()
        await vp.outb(0x43, 0x34)  # channel 0, LSB then MSB, mode 2
        await vp.outb(0x40, 1193 & 0xFF)
        await vp.outb(0x40, 1193 >> 8)
        edges = [irqs.wait_for_edge(0, limit_ns=2_000_000) for _ in range(5)]
        # The count loads on the next input clock; OUT rises at each count's end.
        assert edges == [-(-(start + 1 + 1193 * k) * NS_PER_SECOND // PIT_HZ) for k in range(1, 6)]
        assert pc.pic.master.irr & 0x01
        assert partition.clock.now_ns == edges[-1]


@pytest.mark.parametrize(("rate", "hz"), [(3, 8192), (6, 1024), (15, 2)])
@pytest.mark.anyio
async def test_rtc_periodic_interrupt_rate_through_a_pc(rate: int, hz: int) -> None:
    """MC146818A datasheet, Periodic Interrupt Rate table: with PIE, IRQ 8 rises once per period of the
    selected rate; it stays high until register C is read."""
    clock = VirtualClock(start_ns=NS_PER_SECOND)
    pc = build_pc(clock=clock)
    irqs = IrqRecorder(clock)
    irqs.tap(pc.rtc.irq)
    clock.watch(pc)
    period_ns = NS_PER_SECOND / hz
    async with FakePartition(pc.router, clock=clock) as partition:
        vp = partition.vp(0)

        async def read_c() -> int:
            await vp.outb(0x70, 0x0C)
            return await vp.inb(0x71)

        await vp.outb(0x70, 0x0A)
        await vp.outb(0x71, 0x20 | rate)  # divider on, rate select
        await vp.outb(0x70, 0x0B)
        await vp.outb(0x71, 0x42)  # PIE, 24-hour
        await read_c()
        edges = []
        for _ in range(6):
            edges.append(irqs.wait_for_edge(8, limit_ns=int(period_ns) + 1))
            assert irqs.level(8) and pc.pic.master.irr & 0x04  # IRQ 8 reaches the PIC's cascade
            assert await read_c() & 0xE0 == 0xC0  # IRQF and PF, no alarm (UF also sets each second)
            assert not irqs.level(8)
        # The divider started with the RTC, at 1 s: a period's end is 1 s + k periods, to the nanosecond.
        for k, edge in enumerate(edges, start=1):
            assert abs(edge - (NS_PER_SECOND + k * period_ns)) <= 1
