"""The MC146818 RTC and CMOS RAM at 0x70/0x71, written from the Motorola MC146818A datasheet (section names in
each test) and the IBM PC AT Technical Reference's CMOS RAM map. Time comes from a fake clock: nothing
sleeps. The clock was built at 100.0 s, so the divider's second boundaries fall on whole seconds."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dispatcher import IrqRecorder, PortAccess, Router
from examples.rtc import Rtc146818
from transports.testing import FakePartition, FakeVP

pytestmark = pytest.mark.anyio

INDEX, DATA = 0x70, 0x71
SEC, SEC_ALARM, MIN, MIN_ALARM, HOUR, HOUR_ALARM, DOW, DAY, MONTH, YEAR = range(10)
A, B, C, D, CENTURY = 0x0A, 0x0B, 0x0C, 0x0D, 0x32
START = datetime(2024, 7, 4, 15, 30, 45)  # a Thursday


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def irqs() -> IrqRecorder:
    return IrqRecorder()


@pytest.fixture
def rtc(clock: Clock, irqs: IrqRecorder) -> Rtc146818:
    return Rtc146818(irq=irqs.line(8), clock=clock, start=START)


@pytest.fixture
def router(rtc: Rtc146818) -> Router:
    router = Router()
    router.include(rtc)
    return router


async def read(vp: FakeVP, index: int) -> int:
    await vp.outb(INDEX, index)
    return await vp.inb(DATA)


async def write(vp: FakeVP, index: int, value: int) -> None:
    await vp.outb(INDEX, index)
    await vp.outb(DATA, value)


async def clock_fields(vp: FakeVP) -> list[int]:
    return [await read(vp, i) for i in (SEC, MIN, HOUR, DOW, DAY, MONTH, YEAR, CENTURY)]


async def test_status_register_defaults(fake_vp: FakeVP) -> None:
    """MC146818A datasheet, Registers A-D, as PC firmware leaves them: A = 0x26 (32.768 kHz, 1024 Hz rate),
    B = 0x02 (BCD, 24-hour, no interrupts), C = 0, D = 0x80 (VRT: valid RAM and time)."""
    assert await read(fake_vp, A) == 0x26
    assert await read(fake_vp, B) == 0x02
    assert await read(fake_vp, C) == 0x00
    assert await read(fake_vp, D) == 0x80


async def test_time_in_bcd_24_hour(fake_vp: FakeVP) -> None:
    """MC146818A datasheet, Time, Calendar and Alarm Data Modes (BCD, 24-hour): seconds, minutes, hours,
    day of week (Sunday = 1), date, month, year; the PC keeps the century at 0x32."""
    assert await clock_fields(fake_vp) == [0x45, 0x30, 0x15, 0x05, 0x04, 0x07, 0x24, 0x20]


async def test_time_in_binary_and_12_hour(fake_vp: FakeVP) -> None:
    """MC146818A datasheet, Register B DM and 24/12 bits and the Data Modes table: binary values; in 12-hour
    mode hours are 1-12 with bit 7 set for PM."""
    await write(fake_vp, B, 0x06)  # binary, 24-hour
    assert await clock_fields(fake_vp) == [45, 30, 15, 5, 4, 7, 24, 20]
    await write(fake_vp, B, 0x04)  # binary, 12-hour
    assert await read(fake_vp, HOUR) == 0x83
    await write(fake_vp, B, 0x00)  # BCD, 12-hour
    assert await read(fake_vp, HOUR) == 0x83
    await write(fake_vp, B, 0x80)  # SET to write the time
    for hour, expected in ((0x12, 0x12), (0x92, 0x92), (0x11, 0x11), (0x91, 0x91)):
        await write(fake_vp, HOUR, hour)
        assert await read(fake_vp, HOUR) == expected
    await write(fake_vp, B, 0x82)
    assert await read(fake_vp, HOUR) == 0x23  # 11 PM


async def test_update_cycle_advances_the_calendar(fake_vp: FakeVP, clock: Clock, rtc: Rtc146818) -> None:
    """MC146818A datasheet, Update Cycle: once a second the time advances through minutes, hours, days,
    months and years, with leap years; the century byte follows."""
    rtc.set_time(datetime(2099, 12, 31, 23, 59, 58))
    clock.now = 101.5
    assert await clock_fields(fake_vp) == [0x59, 0x59, 0x23, 0x05, 0x31, 0x12, 0x99, 0x20]
    clock.now = 102.5
    assert await clock_fields(fake_vp) == [0x00, 0x00, 0x00, 0x06, 0x01, 0x01, 0x00, 0x21]
    rtc.set_time(datetime(2024, 2, 28, 23, 59, 59))
    clock.now = 103.5
    assert await read(fake_vp, DAY) == 0x29 and await read(fake_vp, MONTH) == 0x02
    assert rtc.current_time() == datetime(2024, 2, 29, 0, 0, 0)


async def test_set_bit_stops_updates_and_clears_uie(fake_vp: FakeVP, clock: Clock) -> None:
    """MC146818A datasheet, Register B SET and UIE: with SET the time does not advance and may be written;
    SET going high clears UIE; clearing SET resumes counting from the written time, at the divider's phase."""
    await write(fake_vp, B, 0x12)  # UIE, 24-hour
    await write(fake_vp, B, 0x92)
    assert await read(fake_vp, B) == 0x82
    await write(fake_vp, SEC, 0x00)
    await write(fake_vp, MIN, 0x00)
    await write(fake_vp, HOUR, 0x08)
    clock.now = 110.2
    assert await read(fake_vp, SEC) == 0x00
    await write(fake_vp, B, 0x02)
    clock.now = 110.9
    assert await read(fake_vp, SEC) == 0x00
    clock.now = 111.0
    assert [await read(fake_vp, i) for i in (SEC, MIN, HOUR)] == [0x01, 0x00, 0x08]


async def test_divider_reset_and_first_update_half_a_second_later(fake_vp: FakeVP, clock: Clock) -> None:
    """MC146818A datasheet, Register A DV2-DV0 and Divider Stages: 11x holds the divider in reset and the
    time still; writing 010 starts it, and the first update comes 500 ms later."""
    await write(fake_vp, A, 0x76)
    clock.now = 105.3
    assert await read(fake_vp, SEC) == 0x45
    await write(fake_vp, A, 0x26)
    clock.now = 105.79
    assert await read(fake_vp, SEC) == 0x45
    clock.now = 105.81
    assert await read(fake_vp, SEC) == 0x46
    clock.now = 106.81
    assert await read(fake_vp, SEC) == 0x47


async def test_uip_bit(fake_vp: FakeVP, clock: Clock) -> None:
    """MC146818A datasheet, Register A UIP and Update Cycle: UIP is 1 from 244 us before an update through its
    1984 us; 0 otherwise, and 0 while SET inhibits updates. A bit 7 cannot be written."""
    clock.now = 100.5
    assert await read(fake_vp, A) == 0x26
    clock.now = 101.0 - 0.002
    assert await read(fake_vp, A) == 0xA6
    clock.now = 101.0 - 0.0025
    assert await read(fake_vp, A) == 0x26
    await write(fake_vp, A, 0xA6)
    clock.now = 101.5
    assert await read(fake_vp, A) == 0x26
    clock.now = 102.0 - 0.002
    assert await read(fake_vp, A) == 0xA6
    await write(fake_vp, B, 0x82)
    assert await read(fake_vp, A) == 0x26


@pytest.mark.parametrize(("rate", "period"), [(1, 1 / 256), (2, 1 / 128), (3, 1 / 8192), (6, 1 / 1024), (15, 0.5)])
async def test_periodic_interrupt_rates(
    rate: int, period: float, fake_vp: FakeVP, clock: Clock, rtc: Rtc146818, irqs: IrqRecorder
) -> None:
    """MC146818A datasheet, Periodic Interrupt Rate table (32.768 kHz time base) and Register C PF: with PIE,
    PF and IRQF are set every period and IRQ 8 rises; reading C clears them and lowers the line."""
    await write(fake_vp, A, 0x20 | rate)
    await read(fake_vp, C)
    await write(fake_vp, B, 0x42)
    due = rtc.next_due()
    assert due == pytest.approx(100.0 + period)
    clock.now = 100.0 + period * 0.99
    rtc.update()
    assert not irqs.level(8)
    clock.now = 100.0 + period * 1.01
    rtc.update()
    assert irqs.level(8)
    assert rtc.next_due() is None  # the line stays high until C is read
    assert await read(fake_vp, C) == 0xC0
    assert not irqs.level(8)
    assert await read(fake_vp, C) == 0x00


async def test_a_loop_woken_at_next_due_sees_the_interrupt(irqs: IrqRecorder) -> None:
    """A machine loop that sleeps until next_due() and updates there finds IRQ 8 raised, however the clock's
    origin rounds (periodic at 8192 Hz together with the update-ended interrupt)."""
    clock = Clock()
    clock.now = 12345.678901
    rtc = Rtc146818(irq=irqs.line(8), clock=clock, start=START)
    rtc.cmos[A], rtc.cmos[B] = 0x23, 0x52
    for _ in range(50):
        due = rtc.next_due()
        assert due is not None
        clock.now = due
        rtc.update()
        assert irqs.level(8)
        rtc.index_port(PortAccess(INDEX, 1, True, C, 0, 0, 0))
        rtc.data_port(PortAccess(DATA, 1, False, 0, 0, 0, 0))
        assert not irqs.level(8)


async def test_no_periodic_interrupt_with_rate_zero(fake_vp: FakeVP, clock: Clock, rtc: Rtc146818) -> None:
    """MC146818A datasheet, Periodic Interrupt Rate table: RS3-RS0 = 0000 is none."""
    await write(fake_vp, A, 0x20)
    await read(fake_vp, C)
    await write(fake_vp, B, 0x42)
    assert rtc.next_due() is None
    clock.now = 103.0
    assert await read(fake_vp, C) & 0x40 == 0


async def test_update_ended_interrupt(fake_vp: FakeVP, clock: Clock, rtc: Rtc146818, irqs: IrqRecorder) -> None:
    """MC146818A datasheet, Update-Ended Interrupt (Register B UIE, Register C UF): after each update cycle."""
    await write(fake_vp, A, 0x20)
    await read(fake_vp, C)
    await write(fake_vp, B, 0x12)
    assert rtc.next_due() == 101.0
    clock.now = 101.0
    rtc.update()
    assert irqs.level(8)
    assert await read(fake_vp, C) == 0x90
    assert await read(fake_vp, SEC) == 0x46


async def test_alarm_interrupt(fake_vp: FakeVP, clock: Clock, rtc: Rtc146818, irqs: IrqRecorder) -> None:
    """MC146818A datasheet, Alarm Interrupt (Register B AIE, Register C AF): when seconds, minutes and hours
    match the alarm bytes after an update."""
    await write(fake_vp, A, 0x20)
    await write(fake_vp, SEC_ALARM, 0x00)
    await write(fake_vp, MIN_ALARM, 0x31)
    await write(fake_vp, HOUR_ALARM, 0x15)
    await read(fake_vp, C)
    await write(fake_vp, B, 0x22)
    assert rtc.next_due() == 115.0  # 15:30:45 at 100 s
    clock.now = 114.9
    rtc.update()
    assert not irqs.level(8)
    clock.now = 115.0
    rtc.update()
    assert irqs.level(8)
    assert await read(fake_vp, C) == 0xB0  # IRQF, AF, and UF (not enabled)


async def test_alarm_dont_care_values(fake_vp: FakeVP, clock: Clock, rtc: Rtc146818) -> None:
    """MC146818A datasheet, Alarm Interrupt: an alarm byte of 0xC0-0xFF is "don't care" and matches any
    value; with all three the alarm fires every second. An alarm missed while nobody looked is still
    flagged at the next look."""
    await write(fake_vp, A, 0x20)
    for index in (SEC_ALARM, MIN_ALARM, HOUR_ALARM):
        await write(fake_vp, index, 0xC0)
    await write(fake_vp, B, 0x22)
    await read(fake_vp, C)
    assert rtc.next_due() == 101.0
    await write(fake_vp, SEC_ALARM, 0x00)
    await write(fake_vp, MIN_ALARM, 0x00)  # every hour on the hour: the next is 16:00:00
    assert rtc.next_due() == 100.0 + 29 * 60 + 15
    clock.now = 100.0 + 5 * 3600
    assert await read(fake_vp, C) == 0xB0


async def test_flags_without_enables_and_irqf(fake_vp: FakeVP, clock: Clock, irqs: IrqRecorder) -> None:
    """MC146818A datasheet, Register C: PF, AF and UF are set whatever the enables (for polling); IRQF and
    the IRQ pin follow PF.PIE + AF.AIE + UF.UIE, so enabling a set flag interrupts at once."""
    clock.now = 101.0
    await write(fake_vp, B, 0x02)
    assert not irqs.level(8)
    await write(fake_vp, B, 0x12)
    assert irqs.level(8)
    await write(fake_vp, B, 0x02)
    assert not irqs.level(8)
    assert await read(fake_vp, C) == 0x50  # PF (1024 Hz) and UF, no IRQF


async def test_read_only_registers(fake_vp: FakeVP) -> None:
    """MC146818A datasheet, Registers C and D are read-only; D's VRT is always 1 here (good battery)."""
    await write(fake_vp, C, 0xFF)
    await write(fake_vp, D, 0x00)
    assert await read(fake_vp, C) == 0x00
    assert await read(fake_vp, D) == 0x80


async def test_day_of_week_is_its_own_counter(fake_vp: FakeVP, clock: Clock) -> None:
    """MC146818A datasheet, Address Map (day of week, 1-7): the guest may set it; the chip advances it at
    midnight and does not derive it from the date."""
    await write(fake_vp, B, 0x82)
    await write(fake_vp, DOW, 0x02)
    await write(fake_vp, DAY, 0x10)  # the date changes, the day of week stays
    assert await read(fake_vp, DOW) == 0x02
    await write(fake_vp, HOUR, 0x23)
    await write(fake_vp, MIN, 0x59)
    await write(fake_vp, SEC, 0x59)
    await write(fake_vp, B, 0x02)
    clock.now = 101.0
    assert await read(fake_vp, DOW) == 0x03
    assert await read(fake_vp, DAY) == 0x11


async def test_garbage_writes_never_fail(fake_vp: FakeVP) -> None:
    """MC146818A datasheet: values outside a field's range give undefined results; here they carry over
    like mktime and the guest never sees an error."""
    await write(fake_vp, B, 0x86)
    for index in (SEC, MIN, HOUR, DOW, DAY, MONTH, YEAR, CENTURY):
        await write(fake_vp, index, 0xFF)
    await write(fake_vp, B, 0x02)
    fields = await clock_fields(fake_vp)
    assert all(0 <= value <= 0x99 for value in fields[:7])


async def test_cmos_ram_and_nmi_mask(fake_vp: FakeVP, rtc: Rtc146818) -> None:
    """IBM PC AT Technical Reference, CMOS RAM and port 70h: bits 0-6 of the index select one of 128 bytes,
    bit 7 masks NMI; bytes 0x0E-0x7F are RAM. Port 0x70 cannot be read (0xFF)."""
    for index in (0x0E, 0x40, 0x7F):
        await write(fake_vp, index, index ^ 0x5A)
    await fake_vp.outb(INDEX, 0x80 | 0x40)
    assert rtc.nmi_masked
    assert await fake_vp.inb(DATA) == 0x40 ^ 0x5A
    await fake_vp.outb(INDEX, 0x7F)
    assert not rtc.nmi_masked
    assert await fake_vp.inb(DATA) == 0x7F ^ 0x5A
    assert await fake_vp.inb(INDEX) == 0xFF


async def test_wider_accesses_arrive_as_bytes(fake_vp: FakeVP) -> None:
    """MC146818A datasheet, Bus Interface (AD0-AD7, 8 bits): a 16-bit OUT to 0x70 selects with AL and writes
    AH to the data port; a 16-bit IN returns 0xFF (index port) and the data byte."""
    await fake_vp.outw(INDEX, 0xA540)
    assert await fake_vp.inw(INDEX) == 0xA5FF
    assert await fake_vp.inl(DATA) == 0xFFFF_FFA5


async def test_memory_size_fields_as_seabios_reads_them(fake_vp: FakeVP, rtc: Rtc146818) -> None:
    """IBM PC AT CMOS map (0x15-0x18, 0x30-0x31, checksum 0x2E-0x2F over 0x10-0x2D) with the QEMU/Bochs
    extensions 0x34-0x35 and 0x5B-0x5D: SeaBIOS's qemu_preinit sizes RAM from 0x34/0x35 (64 KiB units above
    16 MiB), or 0x30/0x31 (KiB above 1 MiB) when those are zero."""
    rtc.cmos[0x10] = 0x40  # a 1.44 MB floppy, part of the checksum
    rtc.set_memory_size(512 << 20, 4 << 30)
    low = [await read(fake_vp, i) for i in range(0x15, 0x19)]
    assert low == [0x80, 0x02, 0xFF, 0xFF]
    assert [await read(fake_vp, i) for i in (0x30, 0x31)] == [0xFF, 0xFF]
    ram = (await read(fake_vp, 0x34) << 16 | await read(fake_vp, 0x35) << 24) + (16 << 20)
    assert ram == 512 << 20
    high = await read(fake_vp, 0x5B) << 16 | await read(fake_vp, 0x5C) << 24 | await read(fake_vp, 0x5D) << 32
    assert high == 4 << 30
    checksum = await read(fake_vp, 0x2E) << 8 | await read(fake_vp, 0x2F)
    assert checksum == 0x40 + 0x80 + 0x02 + 0xFF + 0xFF
    rtc.set_memory_size(15 << 20)
    assert [await read(fake_vp, i) for i in (0x34, 0x35)] == [0, 0]
    small = (await read(fake_vp, 0x30) << 10 | await read(fake_vp, 0x31) << 18) + (1 << 20)
    assert small == 15 << 20


async def test_set_memory_size_rejects_nonsense(rtc: Rtc146818) -> None:
    """Sizes that the fields cannot hold are a configuration error."""
    with pytest.raises(ValueError, match="above_4g"):
        rtc.set_memory_size(1 << 30, 1 << 50)


async def test_host_sets_the_clock(fake_vp: FakeVP, clock: Clock, rtc: Rtc146818) -> None:
    """The user's clock: set_time moves the RTC; the divider phase is kept."""
    clock.now = 100.7
    rtc.set_time(datetime(1999, 12, 31, 23, 59, 59))
    assert await clock_fields(fake_vp) == [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19]
    clock.now = 101.0
    assert rtc.current_time() == datetime(2000, 1, 1)


async def test_default_start_is_the_host_clock(clock: Clock) -> None:
    """Without a start time the RTC starts at the host's UTC time."""
    before = datetime.now(UTC).replace(microsecond=0, tzinfo=None)
    rtc = Rtc146818(clock=clock)
    assert before <= rtc.current_time() <= datetime.now(UTC).replace(tzinfo=None)


async def test_configurable_base_and_irq(clock: Clock) -> None:
    """The RTC answers at its io_base and drives the line it is given."""
    irqs = IrqRecorder()
    rtc = Rtc146818(io_base=0x170, irq=irqs.line(5), clock=clock, start=START)
    router = Router()
    router.include(rtc)
    async with FakePartition(router) as partition:
        vp = partition.vp(0)
        await vp.outb(0x170, B)
        await vp.outb(0x171, 0x12)
        clock.now = 101.0
        rtc.update()
        assert irqs.level(5)
        assert await vp.inb(0x71) == 0xFF
