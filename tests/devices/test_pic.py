"""The i8259A PIC pair at 0x20/0x21 and 0xA0/0xA1 with the ELCR at 0x4D0/0x4D1, written from the Intel
8259A datasheet (section names in each test) and the 82371AB PIIX4 datasheet for the ELCR."""

from __future__ import annotations

import pytest

from dispatcher import IrqLine, IrqRecorder, Router
from examples.pic import PicPair
from transports.testing import FakePartition, FakeVP

pytestmark = pytest.mark.anyio

MASTER, SLAVE, ELCR = 0x20, 0xA0, 0x4D0
INTR = 99  # the recorder's number for the CPU's interrupt line


@pytest.fixture
def irqs() -> IrqRecorder:
    return IrqRecorder()


@pytest.fixture
def pics(irqs: IrqRecorder) -> PicPair:
    return PicPair(irq=irqs.line(INTR, "INTR"))


@pytest.fixture
def router(pics: PicPair) -> Router:
    router = Router()
    router.include(pics)
    return router


async def init(vp: FakeVP, *, master_icw4: int = 0x01, slave_icw4: int = 0x01, icw1: int = 0x11) -> None:
    """The PC BIOS sequence: cascade, ICW4 needed, vectors 0x08 and 0x70, slave on IR2."""
    for base, vector, icw3, icw4 in ((MASTER, 0x08, 0x04, master_icw4), (SLAVE, 0x70, 0x02, slave_icw4)):
        await vp.outb(base, icw1)
        await vp.outb(base + 1, vector)
        await vp.outb(base + 1, icw3)
        await vp.outb(base + 1, icw4)


async def irr(vp: FakeVP, base: int = MASTER) -> int:
    await vp.outb(base, 0x0A)  # OCW3: read IRR
    return await vp.inb(base)


async def isr(vp: FakeVP, base: int = MASTER) -> int:
    await vp.outb(base, 0x0B)  # OCW3: read ISR
    return await vp.inb(base)


async def test_power_up_and_initialised_registers_read_zero(fake_vp: FakeVP, pics: PicPair) -> None:
    """8259A datasheet, Initialization Command Words: ICW1 clears the IMR and ISR; IRR is read by default
    (Reading the 8259A Status)."""
    assert await fake_vp.inb(MASTER) == 0  # IRR
    assert await fake_vp.inb(MASTER + 1) == 0  # IMR
    await fake_vp.outb(MASTER + 1, 0xFF)
    await init(fake_vp)
    assert await fake_vp.inb(MASTER + 1) == 0
    assert await fake_vp.inb(SLAVE + 1) == 0
    assert await fake_vp.inb(MASTER) == 0
    assert await isr(fake_vp) == 0
    assert pics.pending_vector() is None


async def test_ocw1_mask_reads_back_and_holds_requests_in_irr(
    fake_vp: FakeVP, pics: PicPair, irqs: IrqRecorder
) -> None:
    """8259A datasheet, Operation Command Words (OCW1) and Interrupt Mask Register: a masked request stays in
    IRR without asserting INT; unmasking it asserts INT."""
    await init(fake_vp)
    await fake_vp.outb(MASTER + 1, 0xFE ^ 0xFF)  # mask IR0 only
    assert await fake_vp.inb(MASTER + 1) == 0x01
    pics.set_irq(0, True)
    assert await irr(fake_vp) == 0x01
    assert not irqs.level(INTR)
    assert pics.pending_vector() is None
    await fake_vp.outb(MASTER + 1, 0x00)
    assert irqs.level(INTR)
    assert pics.pending_vector() == 0x08


async def test_edge_request_is_acknowledged_into_isr_and_retired_by_eoi(
    fake_vp: FakeVP, pics: PicPair, irqs: IrqRecorder
) -> None:
    """8259A datasheet, Interrupt Sequence and End of Interrupt: INTA moves the request from IRR to ISR and
    drops INT; a non-specific EOI (OCW2 0x20) clears the ISR bit."""
    await init(fake_vp)
    pics.set_irq(1, True)
    assert irqs.level(INTR)
    assert pics.pending_vector() == 0x09
    assert pics.pending_vector() == 0x09  # asking has no side effects
    assert pics.acknowledge() == 0x09
    assert not irqs.level(INTR)
    assert await irr(fake_vp) == 0
    assert await isr(fake_vp) == 0x02
    await fake_vp.outb(MASTER, 0x20)
    assert await isr(fake_vp) == 0
    assert pics.pending_vector() is None  # the line is still high, but an edge request is spent


async def test_a_pulse_is_one_edge_request(fake_vp: FakeVP, pics: PicPair) -> None:
    """8259A datasheet, Edge and Level Triggered Modes: in edge mode a low-to-high transition is latched in
    IRR; the line may fall again before the acknowledge, and a line that stays high makes no new request."""
    await init(fake_vp)
    device = IrqLine(pics, 4)
    device.pulse()
    assert await irr(fake_vp) == 0x10
    assert pics.acknowledge() == 0x0C
    device.set(True)
    device.set(True)  # no change, no new edge
    await fake_vp.outb(MASTER, 0x20)
    assert pics.acknowledge() == 0x0C
    await fake_vp.outb(MASTER, 0x20)
    assert pics.pending_vector() is None


async def test_icw1_resets_edge_sense_so_a_high_line_needs_a_new_edge(fake_vp: FakeVP, pics: PicPair) -> None:
    """8259A datasheet, Initialization Command Words: after ICW1 the edge sense circuit is reset, so an IR
    input must make a low-to-high transition to generate an interrupt."""
    pics.set_irq(3, True)
    await init(fake_vp)
    assert await irr(fake_vp) == 0
    pics.set_irq(3, False)
    pics.set_irq(3, True)
    assert await irr(fake_vp) == 0x08


async def test_level_mode_follows_the_line_and_a_vanished_request_is_spurious_ir7(
    fake_vp: FakeVP, pics: PicPair, irqs: IrqRecorder
) -> None:
    """8259A datasheet, Edge and Level Triggered Modes: with LTIM the request follows the level; if it is
    removed before the acknowledge, the 8259A answers IR7 (a spurious interrupt) and sets no ISR bit."""
    await init(fake_vp, icw1=0x19)
    pics.set_irq(5, True)
    assert await irr(fake_vp) == 0x20
    pics.set_irq(5, False)
    assert await irr(fake_vp) == 0
    assert not irqs.level(INTR)
    assert pics.acknowledge() == 0x0F
    assert await isr(fake_vp) == 0
    pics.set_irq(5, True)
    assert pics.acknowledge() == 0x0D
    await fake_vp.outb(MASTER, 0x20)
    assert pics.pending_vector() == 0x0D  # still high: requests again after the EOI


async def test_fully_nested_priorities(fake_vp: FakeVP, pics: PicPair, irqs: IrqRecorder) -> None:
    """8259A datasheet, Fully Nested Mode: IR0 has the highest priority; a request of higher priority than
    the one in service interrupts it, one of lower or equal priority waits for the EOI."""
    await init(fake_vp)
    pics.set_irq(3, True)
    pics.set_irq(5, True)
    assert pics.acknowledge() == 0x0B
    assert not irqs.level(INTR)  # IR5 waits behind IR3
    pics.set_irq(1, True)
    assert irqs.level(INTR)
    assert pics.acknowledge() == 0x09
    assert await isr(fake_vp) == 0x0A
    await fake_vp.outb(MASTER, 0x20)  # non-specific EOI retires the highest in service, IR1
    assert await isr(fake_vp) == 0x08
    assert pics.pending_vector() is None
    await fake_vp.outb(MASTER, 0x20)
    assert pics.acknowledge() == 0x0D


async def test_specific_eoi(fake_vp: FakeVP, pics: PicPair) -> None:
    """8259A datasheet, End of Interrupt (OCW2 SL=1, EOI=1): the named ISR bit is cleared, whatever its
    priority."""
    await init(fake_vp)
    pics.set_irq(6, True)
    pics.acknowledge()
    pics.set_irq(2, True)
    pics.acknowledge()
    assert await isr(fake_vp) == 0x44
    await fake_vp.outb(MASTER, 0x60 | 6)
    assert await isr(fake_vp) == 0x04


async def test_rotation_commands(fake_vp: FakeVP, pics: PicPair) -> None:
    """8259A datasheet, Automatic Rotation (OCW2 0xA0, rotate on non-specific EOI) and Specific Rotation
    (OCW2 0xC0 set priority): the serviced or named level becomes the lowest priority."""
    await init(fake_vp)
    pics.set_irq(1, True)
    pics.set_irq(4, True)
    assert pics.acknowledge() == 0x09
    await fake_vp.outb(MASTER, 0xA0)  # IR1 becomes lowest: IR2 highest
    pics.set_irq(1, False)
    pics.set_irq(1, True)
    assert pics.pending_vector() == 0x0C  # IR4 now outranks IR1
    await fake_vp.outb(MASTER, 0xC0 | 5)  # IR5 lowest: IR6 highest, then 7, 0, 1 ...
    pics.set_irq(7, True)
    assert pics.pending_vector() == 0x0F
    await fake_vp.outb(MASTER, 0xE0 | 7)  # rotate on specific EOI 7 (nothing in service): IR0 highest
    assert pics.pending_vector() == 0x09


async def test_auto_eoi_sets_no_isr_bit(fake_vp: FakeVP, pics: PicPair, irqs: IrqRecorder) -> None:
    """8259A datasheet, Automatic End of Interrupt (AEOI) Mode (ICW4 bit 1): the ISR bit is reset at the end
    of the acknowledge, so the next request of any priority is let through."""
    await init(fake_vp, master_icw4=0x03)
    pics.set_irq(0, True)
    assert pics.acknowledge() == 0x08
    assert await isr(fake_vp) == 0
    pics.set_irq(7, True)
    assert irqs.level(INTR)
    assert pics.acknowledge() == 0x0F


async def test_rotate_in_auto_eoi_mode(fake_vp: FakeVP, pics: PicPair) -> None:
    """8259A datasheet, Automatic Rotation (OCW2 R=1, SL=0, EOI=0 sets rotate in AEOI mode): each
    acknowledged level becomes the lowest priority."""
    await init(fake_vp, master_icw4=0x03)
    await fake_vp.outb(MASTER, 0x80)
    pics.set_irq(0, True)
    pics.set_irq(3, True)
    assert pics.acknowledge() == 0x08
    pics.set_irq(0, False)
    pics.set_irq(0, True)
    assert pics.acknowledge() == 0x0B  # IR0 went to the bottom
    await fake_vp.outb(MASTER, 0x00)  # clear rotate in AEOI


async def test_cascade_through_ir2(fake_vp: FakeVP, pics: PicPair, irqs: IrqRecorder) -> None:
    """8259A datasheet, Cascade Mode: a slave request reaches the master's IR2; the acknowledge sets ISR bit
    2 of the master and the slave's bit, and the slave supplies the vector from its own ICW2."""
    await init(fake_vp)
    pics.set_irq(12, True)
    assert irqs.level(INTR)
    assert pics.pending_vector() == 0x74
    assert pics.acknowledge() == 0x74
    assert await isr(fake_vp) == 0x04
    assert await isr(fake_vp, SLAVE) == 0x10
    await fake_vp.outb(SLAVE, 0x20)
    await fake_vp.outb(MASTER, 0x20)
    assert await isr(fake_vp) == 0
    assert await isr(fake_vp, SLAVE) == 0
    pics.set_irq(8, True)
    assert pics.acknowledge() == 0x70


async def test_slave_request_gone_before_acknowledge_is_slave_ir7(
    fake_vp: FakeVP, pics: PicPair, irqs: IrqRecorder
) -> None:
    """8259A datasheet, Interrupt Sequence (spurious interrupts) with Cascade Mode: the master latched IR2,
    the slave lost its level request; the slave answers its IR7 vector, the master's IR2 is in service."""
    await init(fake_vp)
    await fake_vp.outb(ELCR + 1, 0x04)  # IRQ10 level triggered
    pics.set_irq(10, True)
    pics.set_irq(10, False)
    assert irqs.level(INTR)  # the master's IR2 edge is latched
    assert pics.pending_vector() == 0x77
    assert pics.acknowledge() == 0x77
    assert await isr(fake_vp) == 0x04
    assert await isr(fake_vp, SLAVE) == 0


async def test_spurious_master_acknowledge_sets_nothing(fake_vp: FakeVP, pics: PicPair) -> None:
    """8259A datasheet, Interrupt Sequence: with no request the INTA answers the IR7 vector and ISR is
    unchanged."""
    await init(fake_vp)
    assert pics.acknowledge() == 0x0F
    assert await isr(fake_vp) == 0


async def test_special_fully_nested_mode_lets_a_higher_slave_request_through(
    fake_vp: FakeVP, pics: PicPair, irqs: IrqRecorder
) -> None:
    """8259A datasheet, The Special Fully Nested Mode (ICW4 SFNM): with a slave request in service, a higher
    priority request from the same slave is recognised by the master."""
    await init(fake_vp, master_icw4=0x11)
    pics.set_irq(13, True)
    assert pics.acknowledge() == 0x75
    pics.set_irq(9, True)
    assert irqs.level(INTR)
    assert pics.acknowledge() == 0x71


async def test_without_sfnm_the_same_slave_waits(fake_vp: FakeVP, pics: PicPair, irqs: IrqRecorder) -> None:
    """8259A datasheet, Fully Nested Mode in a cascaded system: the master's IR2 in service blocks the slave."""
    await init(fake_vp)
    pics.set_irq(13, True)
    pics.acknowledge()
    pics.set_irq(9, True)
    assert not irqs.level(INTR)


async def test_special_mask_mode(fake_vp: FakeVP, pics: PicPair, irqs: IrqRecorder) -> None:
    """8259A datasheet, Special Mask Mode (OCW3 ESMM=1, SMM=1): masking the level in service lets lower
    priority requests through; OCW3 0x48 leaves the mode."""
    await init(fake_vp)
    pics.set_irq(3, True)
    pics.acknowledge()
    pics.set_irq(5, True)
    assert not irqs.level(INTR)
    await fake_vp.outb(MASTER + 1, 0x08)  # mask IR3
    await fake_vp.outb(MASTER, 0x68)
    assert irqs.level(INTR)
    assert pics.acknowledge() == 0x0D
    await fake_vp.outb(MASTER, 0x48)
    await fake_vp.outb(MASTER, 0x65)  # specific EOI 5
    assert not irqs.level(INTR)


async def test_poll_command(fake_vp: FakeVP, pics: PicPair) -> None:
    """8259A datasheet, The Poll Command (OCW3 P=1): the next read returns 0x80 | the highest request and
    acknowledges it; with none, bit 7 is clear. Reads after it are ordinary again."""
    await init(fake_vp)
    await fake_vp.outb(MASTER, 0x0C)
    assert await fake_vp.inb(MASTER) == 0
    pics.set_irq(6, True)
    await fake_vp.outb(MASTER, 0x0C)
    assert await fake_vp.inb(MASTER + 1) == 0x86
    assert await isr(fake_vp) == 0x40
    assert await fake_vp.inb(MASTER + 1) == 0  # the IMR again


async def test_read_register_selection_persists(fake_vp: FakeVP, pics: PicPair) -> None:
    """8259A datasheet, Reading the 8259A Status: OCW3 RR/RIS selects IRR or ISR until changed; OCW3 with RR=0
    leaves the selection alone; the data port always reads the IMR."""
    await init(fake_vp)
    pics.set_irq(1, True)
    pics.set_irq(4, True)
    pics.acknowledge()
    await fake_vp.outb(MASTER, 0x0B)
    assert await fake_vp.inb(MASTER) == 0x02
    await fake_vp.outb(MASTER, 0x08)  # OCW3, RR=0
    assert await fake_vp.inb(MASTER) == 0x02
    await fake_vp.outb(MASTER, 0x0A)
    assert await fake_vp.inb(MASTER) == 0x10
    await fake_vp.outb(MASTER + 1, 0x5A)
    assert await fake_vp.inb(MASTER + 1) == 0x5A


async def test_icw2_uses_t7_t3_only(fake_vp: FakeVP, pics: PicPair) -> None:
    """8259A datasheet, ICW2 in 8086 mode: T7-T3 give the vector base; the low three bits are the IR level."""
    await fake_vp.outb(MASTER, 0x11)
    await fake_vp.outb(MASTER + 1, 0x27)
    await fake_vp.outb(MASTER + 1, 0x04)
    await fake_vp.outb(MASTER + 1, 0x01)
    pics.set_irq(3, True)
    assert pics.acknowledge() == 0x23


async def test_single_mode_without_icw4_skips_icw3(fake_vp: FakeVP, pics: PicPair, irqs: IrqRecorder) -> None:
    """8259A datasheet, Initialization Command Words: with SNGL=1 there is no ICW3 and with IC4=0 no ICW4, so
    the next data write is OCW1."""
    await fake_vp.outb(MASTER, 0x13)  # single, ICW4 needed
    await fake_vp.outb(MASTER + 1, 0x40)
    await fake_vp.outb(MASTER + 1, 0x01)  # ICW4 (not ICW3)
    await fake_vp.outb(MASTER + 1, 0xFB)  # OCW1
    assert await fake_vp.inb(MASTER + 1) == 0xFB
    await fake_vp.outb(MASTER, 0x12)  # single, no ICW4
    await fake_vp.outb(MASTER + 1, 0x48)
    await fake_vp.outb(MASTER + 1, 0x00)  # OCW1 at once
    pics.set_irq(2, True)
    assert pics.acknowledge() == 0x4A  # no cascade in single mode: IR2 is an ordinary input


async def test_elcr_masks_and_level_switch(fake_vp: FakeVP, pics: PicPair, irqs: IrqRecorder) -> None:
    """82371AB PIIX4 datasheet, ELCR1/ELCR2 (0x4D0/0x4D1): IRQ 0, 1, 2, 8 and 13 are always edge triggered;
    the others become level triggered when their bit is set. The master's IR2 stays edge triggered, so a slave
    request withdrawn after the master latched IR2 ends as the slave's IR7 (a spurious IRQ 15)."""
    await init(fake_vp)
    await fake_vp.outb(ELCR, 0xFF)
    await fake_vp.outb(ELCR + 1, 0xFF)
    assert await fake_vp.inb(ELCR) == 0xF8
    assert await fake_vp.inb(ELCR + 1) == 0xDE
    assert await fake_vp.inw(ELCR) == 0xDEF8
    await fake_vp.outw(ELCR, 0x0C20)  # IRQ5, IRQ10, IRQ11
    assert await fake_vp.inb(ELCR) == 0x20 and await fake_vp.inb(ELCR + 1) == 0x0C
    pics.set_irq(11, True)
    assert pics.acknowledge() == 0x73
    await fake_vp.outb(SLAVE, 0x20)
    await fake_vp.outb(MASTER, 0x20)
    assert pics.pending_vector() == 0x73  # level: still requesting
    pics.set_irq(11, False)
    assert await irr(fake_vp, SLAVE) == 0
    assert pics.pending_vector() == 0x77
    assert pics.acknowledge() == 0x77
    await fake_vp.outb(MASTER, 0x20)
    assert not irqs.level(INTR)


async def test_wider_accesses_arrive_as_bytes(fake_vp: FakeVP, pics: PicPair) -> None:
    """The 8259A has an 8-bit data bus (datasheet, Pin Description D7-D0): a 16-bit read of 0x20 returns IRR
    in AL and IMR in AH; a 16-bit write puts AL on the command port and AH on the data port; a 32-bit read of
    0xA0 reaches the unclaimed 0xA2/0xA3, which read all ones."""
    await init(fake_vp)
    await fake_vp.outb(MASTER + 1, 0xB8)
    pics.set_irq(0, True)
    assert await fake_vp.inw(MASTER) == 0xB801
    await fake_vp.outw(MASTER, 0xFF0B)  # OCW3 read ISR, then OCW1 mask all
    assert await fake_vp.inb(MASTER + 1) == 0xFF
    assert await fake_vp.inb(MASTER) == 0  # ISR
    await fake_vp.outb(SLAVE + 1, 0x3C)
    assert await fake_vp.inl(SLAVE) == 0xFFFF_3C00


async def test_set_irq_rejects_lines_outside_0_to_15(pics: PicPair) -> None:
    """The pair has ISA lines 0-15 only."""
    with pytest.raises(ValueError, match="16"):
        pics.set_irq(16, True)


async def test_configurable_bases(irqs: IrqRecorder) -> None:
    """Each chip answers at the bases it is given; no ELCR when elcr_base is None."""
    pics = PicPair(io_base=0x120, slave_base=0x1A0, elcr_base=None, irq=irqs.line(INTR))
    router = Router()
    router.include(pics)
    assert [(r.first, r.last) for r in router.port_ranges()] == [(0x120, 0x121), (0x1A0, 0x1A1)]
    async with FakePartition(router) as partition:
        vp = partition.vp(0)
        await vp.outb(0x1A1, 0x42)
        assert await vp.inb(0x1A1) == 0x42
        assert await vp.inb(0x21) == 0xFF  # unclaimed
