"""The PC composition: build_pc's wiring, and a scripted probe of the port sequence SeaBIOS runs on it.

The probe follows what a trial boot of Debian's SeaBIOS touched, in order (issue 5): CMOS 0x70/0x71, port
0x92, the debug console 0x402, PCI 0xCF8/0xCFC, fw_cfg 0x510/0x511, DMA 0x0D/0xD4/0xD6/0xDA, the PICs, the
PIT (read-back 0xD2), the i8042, ATA 0x1F0-0x1F7 and 0x170-0x177, and the LPT and COM probes, each step as
SeaBIOS's own drivers (src/hw/*.c) perform it. The fake VP is strict: any completion other than COMPLETED
fails the test.
"""

from __future__ import annotations

import pytest

from dispatcher import BufferMemory, IrqRecorder, Router
from dispatcher.clock import NS_PER_SECOND, VirtualClock, ns_from_seconds
from examples.pc_devices import PC, build_pc
from transports.testing import CpuMode, FakePartition, FakeVP

pytestmark = pytest.mark.anyio

MiB = 1 << 20
SECTORS = 2048


class Events:
    def __init__(self) -> None:
        self.exits: list[int] = []
        self.resets = 0
        self.a20: list[bool] = []
        self.debug = bytearray()
        self.serial = bytearray()

    def reset(self) -> None:
        self.resets += 1


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(start_ns=1000 * NS_PER_SECOND)


@pytest.fixture
def intr() -> IrqRecorder:
    return IrqRecorder()


@pytest.fixture
def pc(events: Events, intr: IrqRecorder, clock: VirtualClock) -> PC:
    disk = bytearray(SECTORS * 512)
    disk[510:512] = b"\x55\xaa"
    return build_pc(
        memory_size=128 * MiB,
        disk=disk,
        serial_sink=events.serial.extend,
        debug_sink=events.debug.extend,
        clock=clock,
        intr=intr.line(0, "INTR"),
        on_exit=events.exits.append,
        on_reset=events.reset,
        on_a20=events.a20.append,
    )


@pytest.fixture
def router(pc: PC) -> Router:
    return pc.router


async def cmos(vp: FakeVP, index: int) -> int:
    await vp.outb(0x70, 0x80 | index)  # SeaBIOS keeps NMI disabled while it reads CMOS
    return await vp.inb(0x71)


async def pci_read(vp: FakeVP, bdf: int, offset: int) -> int:
    await vp.outl(0xCF8, 0x8000_0000 | bdf << 8 | offset & 0xFC)
    return await vp.inl(0xCFC)


async def kbc_command(vp: FakeVP, command: int, *data: int, replies: int = 0) -> list[int]:
    """SeaBIOS ps2port.c __i8042_command: wait for IBF clear, write, send params, wait OBF per reply."""
    assert not await vp.inb(0x64) & 0x02
    await vp.outb(0x64, command)
    for byte in data:
        assert not await vp.inb(0x64) & 0x02
        await vp.outb(0x60, byte)
    out = []
    for _ in range(replies):
        assert await vp.inb(0x64) & 0x01
        out.append(await vp.inb(0x60))
    return out


async def ata_detect(vp: FakeVP, base: int, ctrl: int) -> str | None:
    """SeaBIOS ata.c ata_detect for device 0: floating-bus check, register probe, reset, IDENTIFY PACKET,
    then IDENTIFY DEVICE; returns the model string, or None when nothing answers."""
    status = await vp.inb(base + 7)
    if status == 0xFF:  # powerup_await_non_bsy: all bits set is a floating bus
        await vp.outb(base + 6, 0xA0)
        return None if await vp.inb(base + 6) != 0xA0 else "?"
    await vp.outb(base + 6, 0xA0)
    dh = await vp.inb(base + 6)
    await vp.outb(base + 2, 0x55)
    await vp.outb(base + 3, 0xAA)
    if (await vp.inb(base + 2), await vp.inb(base + 3), dh) != (0x55, 0xAA, 0xA0):
        return None
    await vp.outb(ctrl, 0x08 | 0x02 | 0x04)  # ata_reset: SRST with nIEN
    await vp.outb(ctrl, 0x08 | 0x02)
    assert not await vp.inb(base + 7) & 0x80
    await vp.outb(base + 6, 0xA0)
    for command in (0xA1, 0xEC):  # IDENTIFY PACKET DEVICE first; an ATA disk aborts it
        await vp.outb(ctrl, 0x08 | 0x02)
        await vp.outb(base + 6, 0xA0)
        for port in range(base + 1, base + 6):
            await vp.outb(port, 0)
        await vp.outb(base + 7, command)
        await vp.inb(ctrl)  # the 400 ns pause
        status = await vp.inb(base + 7)
        if command == 0xA1:
            assert status & 0x01 and await vp.inb(base + 1) == 0x04
            continue
        assert status & 0x58 == 0x58
        vp.rdi, vp.rcx = 0x7000, 256  # insw_fl: rep insw into a stack buffer
        await vp.insw(base, rep=True)
        memory = vp.partition.memory
        assert memory is not None and vp.rcx == 0
        raw = memory.read(0x7000, 512)
        words = [int.from_bytes(raw[i : i + 2], "little") for i in range(0, 512, 2)]
        assert await vp.inb(base + 7) & 0x89 == 0  # BSY, DRQ, ERR clear afterwards
        await vp.outb(ctrl, 0x08)
        assert words[93] & 0xDF61 == 0x4041  # device 1 absent: SeaBIOS skips it
        return b"".join(bytes((w >> 8, w & 0xFF)) for w in words[27:47]).decode().strip()
    return None


async def test_seabios_port_sequence(pc: PC, events: Events) -> None:
    """The SeaBIOS probe, in boot order, with no error completion and the answers a PC gives."""
    ram = BufferMemory([(0, bytearray(0x10000))])
    async with FakePartition(pc.router, mode=CpuMode.PROTECTED, memory=ram) as partition:
        vp = partition.vp(0)
        # CMOS: shutdown status, then the memory size SeaBIOS computes RAM from without fw_cfg.
        assert await cmos(vp, 0x0F) == 0
        await vp.outb(0x70, 0x8F)
        await vp.outb(0x71, 0x00)
        over_16m = await cmos(vp, 0x34) | await cmos(vp, 0x35) << 8
        assert over_16m == (128 - 16) * MiB // 0x10000
        assert [await cmos(vp, i) for i in (0x5B, 0x5C, 0x5D)] == [0, 0, 0]
        # Port 0x92: enable A20.
        await vp.outb(0x92, await vp.inb(0x92) | 0x02)
        assert pc.a20
        # Debug console: probe, then print.
        assert await vp.inb(0x402) == 0xE9
        for byte in b"SeaBIOS (version 1.16)\n":
            await vp.outb(0x402, byte)
        assert bytes(events.debug) == b"SeaBIOS (version 1.16)\n"
        # PCI: the host bridge identifies QEMU's i440FX; scan bus 0.
        assert await pci_read(vp, 0x00, 0x00) == 0x1237_8086
        found = {}
        for device in range(32):
            vendor = await pci_read(vp, device << 3, 0x00)
            if vendor == 0xFFFF_FFFF:
                continue
            found[device << 3] = vendor
            if (await pci_read(vp, device << 3, 0x0C)) >> 16 & 0x80:  # multi-function header
                for function in range(1, 8):
                    vendor = await pci_read(vp, device << 3 | function, 0x00)
                    if vendor != 0xFFFF_FFFF:
                        found[device << 3 | function] = vendor
        assert found == {0x00: 0x1237_8086, 0x08: 0x7000_8086, 0x09: 0x7010_8086}
        assert await pci_read(vp, 0x09, 0x08) >> 8 == 0x010100  # IDE, legacy mode
        # fw_cfg: select the signature; the unclaimed port reads all ones, so SeaBIOS finds no QEMU fw_cfg.
        await vp.outw(0x510, 0x0000)
        assert bytes([await vp.inb(0x511) for _ in range(4)]) == b"\xff" * 4
        # DMA: master clear on both controllers, channel 4 cascade, unmask it (all unclaimed, dropped).
        await vp.outb(0x0D, 0)
        await vp.outb(0xDA, 0)
        await vp.outb(0xD6, 0xC0)
        await vp.outb(0xD4, 0)
        # PICs: ICW1-ICW4, vector bases 0x08/0x70, then the masks.
        for port, vector, cascade in ((0x20, 0x08, 0x04), (0xA0, 0x70, 0x02)):
            await vp.outb(port, 0x11)
            await vp.outb(port + 1, vector)
            await vp.outb(port + 1, cascade)
            await vp.outb(port + 1, 0x01)
        await vp.outb(0x21, 0xFB)
        await vp.outb(0xA1, 0xFF)
        assert (await vp.inb(0x21), await vp.inb(0xA1)) == (0xFB, 0xFF)
        # PIT: channel 0 in mode 2 with the full count, then the read-back command (count, channel 0).
        await vp.outb(0x43, 0x34)
        await vp.outb(0x40, 0x00)
        await vp.outb(0x40, 0x00)
        await vp.outb(0x43, 0xD2)
        count = await vp.inb(0x40) | await vp.inb(0x40) << 8
        assert 0 <= count <= 0xFFFF
        await vp.outb(0x61, await vp.inb(0x61) & 0x0C | 0x01)  # channel 2 gate on, speaker off
        # i8042: flush, self-test, keyboard interface test, keyboard reset.
        while await vp.inb(0x64) & 0x01:
            await vp.inb(0x60)
        assert await kbc_command(vp, 0xAA, replies=1) == [0x55]
        assert await kbc_command(vp, 0xAB, replies=1) == [0x00]
        await kbc_command(vp, 0x60, 0x30)  # both ports disabled, interrupts off
        await kbc_command(vp, 0x60, 0x20)  # keyboard port enabled
        await vp.outb(0x60, 0xFF)
        assert [await vp.inb(0x60) for _ in range(2)] == [0xFA, 0xAA]
        # ATA: the primary channel has the disk, the secondary floats.
        assert await ata_detect(vp, 0x1F0, 0x3F6) == "intercept-dispatch ATA disk"
        assert await ata_detect(vp, 0x170, 0x376) is None
        # LPT: write AAh to the data port and read it back; nothing answers.
        for port in (0x378, 0x278, 0x3BC):
            await vp.outb(port + 2, await vp.inb(port + 2) & 0xDF)
            await vp.outb(port, 0xAA)
            assert await vp.inb(port) == 0xFF
        # COM: IER takes 02h and IIR reports THR empty on COM1 only (SeaBIOS serial.c detect_serial).
        for port, present in ((0x3F8, True), (0x2F8, False), (0x3E8, False), (0x2E8, False)):
            await vp.outb(port + 1, 0x02)
            ier = await vp.inb(port + 1)
            assert (ier == 0x02) is present
            if present:
                assert await vp.inb(port + 2) & 0x3F in (0x01, 0x02)
                await vp.outb(port + 1, 0x00)
        # POST code and the exit device end the run.
        await vp.outb(0x80, 0x3F)
        await vp.outw(0x501, 0x0001)
    stats = partition.dispatcher.stats
    assert stats.handler_failed == stats.deadline_exceeded == stats.protocol_errors == stats.unsupported == 0
    assert stats.completed == stats.intercepts
    assert pc.post.codes == [0x3F]
    assert events.exits == [3] and pc.exit_status == 3
    assert stats.unclaimed_reads and stats.unclaimed_writes


async def test_poke_checks(fake_vp: FakeVP) -> None:
    """The two checks `poke` makes against the served default: 8042 self-test answers 55h; the PCI host
    bridge at 00:00.0 reads 12378086h."""
    await fake_vp.outb(0x64, 0xAA)
    assert await fake_vp.inb(0x60) == 0x55
    await fake_vp.outl(0xCF8, 0x8000_0000)
    assert await fake_vp.inl(0xCFC) == 0x1237_8086


async def test_interrupt_lines_reach_the_pic(pc: PC, intr: IrqRecorder, fake_vp: FakeVP) -> None:
    """IRQ wiring: the i8042 on IRQ 1 and the ATA channel on IRQ 14 (through the slave on IRQ 2) reach the
    CPU as vectors base + line once the PICs are initialised and unmasked."""
    for port, vector, cascade in ((0x20, 0x08, 0x04), (0xA0, 0x70, 0x02)):
        await fake_vp.outb(port, 0x11)
        await fake_vp.outb(port + 1, vector)
        await fake_vp.outb(port + 1, cascade)
        await fake_vp.outb(port + 1, 0x01)
    await fake_vp.outb(0x21, 0xF9)  # IRQ 1 and the cascade unmasked
    await fake_vp.outb(0xA1, 0xBF)  # IRQ 14 unmasked
    await fake_vp.outb(0x64, 0xAA)
    assert intr.level(0) and pc.pic.pending_vector() == 0x09
    assert pc.pic.acknowledge() == 0x09
    await fake_vp.inb(0x60)
    await fake_vp.outb(0x20, 0x20)  # EOI
    await fake_vp.outb(0x1F6, 0xA0)
    await fake_vp.outb(0x1F7, 0xEC)  # IDENTIFY: interrupts when the data is ready
    assert pc.pic.pending_vector() == 0x76
    assert pc.pic.acknowledge() == 0x76


async def test_reset_and_a20_sources_are_combined(pc: PC, events: Events, fake_vp: FakeVP) -> None:
    """Reset requests from the i8042 (FEh), port 92h bit 0 and the PIIX 0CF9h register all reach on_reset;
    A20 is the OR of the i8042 output port bit 1 and port 92h bit 1."""
    await fake_vp.outb(0x64, 0xFE)
    await fake_vp.outb(0x92, 0x01)
    await fake_vp.outb(0xCF9, 0x06)
    assert events.resets == pc.reset_requests == 3
    assert pc.a20  # the i8042 powers up with A20 on
    await fake_vp.outb(0x64, 0xDD)
    assert not pc.a20 and events.a20 == [False]
    await fake_vp.outb(0x92, 0x02)
    assert pc.a20 and events.a20 == [False, True]
    await fake_vp.outb(0x64, 0xDF)  # still on: no change reported
    assert events.a20 == [False, True]


async def test_unclaimed_ports_read_all_ones(fake_vp: FakeVP) -> None:
    """Every port outside the PC set is unclaimed: fw_cfg, DMA, the secondary ATA channel, COM2, LPT1."""
    for port in (0x511, 0x0D, 0xC0, 0x177, 0x2F8, 0x378):
        assert await fake_vp.inb(port) == 0xFF
    assert await fake_vp.inl(0x510) == 0xFFFF_FFFF


def test_claims_and_memory_fields() -> None:
    """build_pc's port map, and the CMOS memory fields for RAM above 4 GiB (QEMU's 3 GiB low-memory split)."""
    pc = build_pc(memory_size=5 << 30, exit_port=0xF4)
    claimed = {0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1, *range(0x40, 0x44), 0x61, 0x60, 0x64, 0x70, 0x71, 0x80, 0x92}
    claimed |= {*range(0x3F8, 0x400), 0x402, 0xE9, *range(0xF4, 0xF8), *range(0xCF8, 0xD00)}
    assert all(pc.router.lookup(port, write=True) is not None for port in claimed)
    others = [p for p in range(0x10000) if p not in claimed]
    assert all(pc.router.lookup(p, write=True) is None and pc.router.lookup(p, write=False) is None for p in others)
    assert pc.ata is None
    assert pc.rtc.cmos[0x5B] | pc.rtc.cmos[0x5C] << 8 | pc.rtc.cmos[0x5D] << 16 == (2 << 30) >> 16
    assert pc.rtc.cmos[0x34] | pc.rtc.cmos[0x35] << 8 == ((3 << 30) - (16 << 20)) >> 16
    assert pc.pci.function(0, 1, 1) is None  # no IDE function without a disk
    with pytest.raises(ValueError, match="less than 1 MiB"):
        build_pc(memory_size=1000)


def test_poll_and_next_due(pc: PC, clock: VirtualClock) -> None:
    """The machine loop's side: next_due says when the PIT's channel 0 next changes OUT; poll at that time
    moves IRQ 0, and the PIC latches the rising edge in IRR."""
    clock.watch(pc)  # polls the PC at each next_due(), as a machine loop does
    for _ in range(2):  # OUT starts high in mode 3: falls, then rises
        due = pc.next_due()
        assert due is not None and due >= clock()  # the PIT runs at power-up
        assert clock.advance_to_next_deadline() == ns_from_seconds(due)
    assert pc.pit.irq.level and pc.pic.master.irr & 1
