"""ATA PIO disks on a channel, written from ATA/ATAPI-6 (T13 1410D): its register, command and protocol clauses.

Each test drives the channel through the fake VP with the port sequence a driver (SeaBIOS's ata.c among
them) uses: select the device, load the task file, write the command, poll Status for DRQ, move the data.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest

from dispatcher import BufferMemory, BulkAccess, IrqRecorder, PortAccess, Router
from examples.ata import SECTOR_SIZE, AtaChannel, AtaDisk
from transports.testing import FakePartition, FakeVP

pytestmark = pytest.mark.anyio

BASE, CTRL = 0x1F0, 0x3F6
DATA, ERROR, COUNT, LBA_LOW, LBA_MID, LBA_HIGH, DEVICE, STATUS = range(BASE, BASE + 8)
ERR, DRQ, DSC, DRDY, BSY = 0x01, 0x08, 0x10, 0x40, 0x80
ABRT, IDNF = 0x04, 0x10
NIEN, SRST, HOB = 0x02, 0x04, 0x80
SECTORS = 4 * 16 * 63  # default geometry 4/16/63
BUFFER = 0x10000  # where string I/O puts the data in guest memory


def pattern(lba: int) -> bytes:
    return (lba.to_bytes(4, "little") + bytes(range(4, 16))) * (SECTOR_SIZE // 16)


_TEMPLATE = b"".join(pattern(lba) for lba in range(SECTORS))


def image(sectors: int = SECTORS) -> bytearray:
    """A disk whose sector ``lba`` holds ``pattern(lba)``."""
    return bytearray(_TEMPLATE[: sectors * SECTOR_SIZE])


@pytest.fixture
def irqs() -> IrqRecorder:
    return IrqRecorder()


@pytest.fixture
def disk() -> AtaDisk:
    return AtaDisk(image(), model="QEMU HARDDISK", serial="QM00001", firmware="2.5+")


@pytest.fixture
def channel(disk: AtaDisk, irqs: IrqRecorder) -> AtaChannel:
    return AtaChannel(disk, irq=irqs.line(14))


@pytest.fixture
def router(channel: AtaChannel) -> Router:
    router = Router()
    router.include(channel)
    return router


def partition(router: Router) -> FakePartition:
    """A fake partition with 64 KiB of guest memory at BUFFER for REP INS/OUTS."""
    return FakePartition(router, memory=BufferMemory([(BUFFER, bytearray(0x10000))]))


@pytest.fixture
async def fake_partition(router: Router) -> AsyncIterator[FakePartition]:
    async with partition(router) as running:
        yield running


async def issue(
    vp: FakeVP, command: int, *, lba: int = 0, count: int = 1, device: int = 0xE0, features: int = 0
) -> None:
    """Load the task file (LBA28 layout unless ``device`` says otherwise) and write the command."""
    await vp.outb(DEVICE, device | (lba >> 24 & 0x0F if device & 0x40 else 0))
    await vp.outb(ERROR, features)
    await vp.outb(COUNT, count)
    await vp.outb(LBA_LOW, lba & 0xFF)
    await vp.outb(LBA_MID, lba >> 8 & 0xFF)
    await vp.outb(LBA_HIGH, lba >> 16 & 0xFF)
    await vp.outb(STATUS, command)


async def issue_ext(vp: FakeVP, command: int, *, lba: int, count: int) -> None:
    """A 48-bit command: each register written twice, high-order byte first."""
    await vp.outb(DEVICE, 0xE0)
    for shift in (8, 0):
        await vp.outb(COUNT, count >> shift & 0xFF)
        await vp.outb(LBA_LOW, lba >> 3 * shift & 0xFF)
        await vp.outb(LBA_MID, lba >> 3 * shift + 8 & 0xFF)
        await vp.outb(LBA_HIGH, lba >> 3 * shift + 16 & 0xFF)
    await vp.outb(STATUS, command)


async def read_block(vp: FakeVP, size: int = SECTOR_SIZE, how: str = "rep insw") -> bytes:
    """Read ``size`` bytes from the data port as SeaBIOS does (``rep insw``), or with ``rep insd``, or one
    ``in ax``/``in eax`` at a time."""
    assert await vp.inb(CTRL) & (BSY | DRQ) == DRQ
    width = 2 if how in ("rep insw", "inw") else 4
    if how.startswith("rep"):
        vp.rdi, vp.rcx = BUFFER, size // width
        await (vp.insw if width == 2 else vp.insl)(DATA, rep=True)
        assert vp.rcx == 0 and vp.rdi == BUFFER + size
        return read_memory(vp, size)
    read = vp.inw if width == 2 else vp.inl
    return b"".join([(await read(DATA)).to_bytes(width, "little") for _ in range(size // width)])


async def write_block(vp: FakeVP, data: bytes, how: str = "rep outsw") -> None:
    """Write ``data`` to the data port with ``rep outsw``/``rep outsd`` or one ``out`` at a time."""
    assert await vp.inb(CTRL) & (BSY | DRQ) == DRQ
    width = 2 if how in ("rep outsw", "outw") else 4
    if how.startswith("rep"):
        memory = vp.partition.memory
        assert memory is not None
        memory.write(BUFFER, data)
        vp.rsi, vp.rcx = BUFFER, len(data) // width
        await (vp.outsw if width == 2 else vp.outsl)(DATA, rep=True)
        assert vp.rcx == 0
        return
    write = vp.outw if width == 2 else vp.outl
    for i in range(0, len(data), width):
        await write(DATA, int.from_bytes(data[i : i + width], "little"))


def read_memory(vp: FakeVP, size: int) -> bytes:
    memory = vp.partition.memory
    assert memory is not None
    return memory.read(BUFFER, size)


async def identify(vp: FakeVP, device: int = 0xA0, how: str = "rep insw") -> list[int]:
    await issue(vp, 0xEC, device=device, count=0)
    data = await read_block(vp, how=how)
    return [int.from_bytes(data[i : i + 2], "little") for i in range(0, SECTOR_SIZE, 2)]


def ata_string(words: list[int]) -> str:
    return b"".join(bytes((w >> 8, w & 0xFF)) for w in words).decode().rstrip()


async def test_identify_device_words(fake_vp: FakeVP) -> None:
    """ATA/ATAPI-6, IDENTIFY DEVICE (the identify data table): words 1/3/6 default CHS, 10-19 serial, 23-26 firmware,
    27-46 model (two characters a word, first in the high byte), 47 multiple max, 49 LBA, 53 validity,
    60-61 LBA28 capacity, 80 major version, 82-87 command sets, 93 reset result, 100-103 LBA48 capacity,
    255 integrity word."""
    words = await identify(fake_vp)
    assert words[0] & 0x8000 == 0  # ATA device
    assert (words[1], words[3], words[6]) == (4, 16, 63)
    assert ata_string(words[10:20]) == "QM00001"
    assert ata_string(words[23:27]) == "2.5+"
    assert ata_string(words[27:47]) == "QEMU HARDDISK"
    assert words[27] == ord("Q") << 8 | ord("E")
    assert words[47] == 0x8010
    assert words[49] & 0x0200 and not words[49] & 0x0100  # LBA, no DMA
    assert words[53] & 0x0007 == 0x0007
    assert (words[54], words[55], words[56]) == (4, 16, 63)
    assert words[57] | words[58] << 16 == SECTORS
    assert words[60] | words[61] << 16 == SECTORS
    assert words[64] == 0x0003
    assert words[80] & 0x0040  # ATA/ATAPI-6
    assert words[83] & 0xC000 == 0x4000 and words[83] & 0x0400  # 48-bit address feature set supported
    assert words[86] & 0x0400  # ... and enabled
    assert words[84] & 0xC000 == 0x4000 and words[87] & 0xC000 == 0x4000
    assert sum(words[100:104][i] << 16 * i for i in range(4)) == SECTORS
    assert words[255] & 0xFF == 0xA5
    raw = b"".join(w.to_bytes(2, "little") for w in words)
    assert sum(raw) % 256 == 0


async def test_identify_reset_result_tells_seabios_device1_is_absent(fake_vp: FakeVP) -> None:
    """Word 93: bit 14 set, bit 0 set, device number by jumper, and bit 6 (device 0 responds for device 1):
    the value SeaBIOS tests with (word93 & 0xdf61) == 0x4041 to skip probing device 1."""
    words = await identify(fake_vp)
    assert words[93] & 0xDF61 == 0x4041


async def test_identify_protocol_status_and_interrupt(fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """ATA/ATAPI-6, PIO data-in protocol: the device sets DRQ and asserts INTRQ when the block is ready; reading
    Status clears the interrupt; after the last word DRQ clears, with no further interrupt."""
    await issue(fake_vp, 0xEC, device=0xA0, count=0)
    assert irqs.level(14)
    assert await fake_vp.inb(CTRL) == DRDY | DSC | DRQ  # Alternate Status: no side effect
    assert irqs.level(14)
    assert await fake_vp.inb(STATUS) == DRDY | DSC | DRQ
    assert not irqs.level(14)
    await read_block(fake_vp)
    assert await fake_vp.inb(STATUS) == DRDY | DSC
    assert irqs.rising_edges(14) == 1


@pytest.mark.parametrize("how", ["inw", "inl", "rep insl"])
async def test_data_port_widths_and_string_io(fake_vp: FakeVP, how: str) -> None:
    """The data port at both widths, element by element and as REP INS: a 32-bit access moves two words,
    low word first (PIIX: two 16-bit cycles); every way reads the same IDENTIFY data as ``rep insw``."""
    assert await identify(fake_vp, how=how) == await identify(fake_vp)


async def test_string_io_reaches_the_bulk_handler(
    router: Router, channel: AtaChannel, disk: AtaDisk, fake_vp: FakeVP
) -> None:
    """``rep insw`` of a whole sector is one call of the bulk handler for all 256 words (the per-element
    handler is not used), and ``rep outsw`` likewise; a chunk may span DRQ blocks."""
    bulk = router.bulk_read_table[DATA]
    assert bulk is router.bulk_write_table[DATA] and bulk.handler == channel.data_bulk
    element = router.lookup(DATA, write=False)
    assert element is not None and element.handler == channel.command_block
    # Reinstall both handlers behind counters with the router's run-time API, to see which one each access reaches.
    calls: list[tuple[str, bool, int]] = []

    def count_element(access: PortAccess) -> int | None:
        if access.port == DATA:
            calls.append(("element", access.is_write, access.size))
        return channel.command_block(access)

    def count_bulk(access: BulkAccess) -> bytes | None:
        calls.append(("bulk", access.is_write, access.size * access.elements))
        return channel.data_bulk(access)

    router.remove(element)  # takes the bulk claim with it
    count = element.last - element.first + 1
    router.add(count_element, element.first, count, access=element.access, max_size=element.max_size)
    router.add_bulk(count_bulk, bulk.first, bulk.last - bulk.first + 1, access=bulk.access)
    await issue(fake_vp, 0x20, lba=40, count=2)
    assert await read_block(fake_vp, 2 * SECTOR_SIZE) == pattern(40) + pattern(41)
    assert await fake_vp.inb(STATUS) == DRDY | DSC
    await issue(fake_vp, 0x30, lba=7, count=2)
    await write_block(fake_vp, b"\x33" * (2 * SECTOR_SIZE))
    assert await fake_vp.inb(STATUS) == DRDY | DSC
    assert disk.read(7, 2) == b"\x33" * (2 * SECTOR_SIZE)
    assert calls == [("bulk", False, 2 * SECTOR_SIZE), ("bulk", True, 2 * SECTOR_SIZE)]


async def test_identify_packet_device_is_aborted(fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """ATA/ATAPI-6, IDENTIFY PACKET DEVICE: on a device without the PACKET feature set is aborted
    (ERR set, ABRT in Error) with an interrupt; SeaBIOS then tries IDENTIFY DEVICE."""
    await issue(fake_vp, 0xA1, device=0xA0, count=0)
    assert irqs.level(14)
    assert await fake_vp.inb(STATUS) == DRDY | ERR
    assert await fake_vp.inb(ERROR) == ABRT
    words = await identify(fake_vp)
    assert ata_string(words[27:47]) == "QEMU HARDDISK"


async def test_read_sectors_lba28_one_block_per_sector(fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """ATA/ATAPI-6, READ SECTORS in LBA mode (Device bit 6): one DRQ block and one interrupt per sector."""
    await issue(fake_vp, 0x20, lba=1000, count=3)
    data = b""
    for _ in range(3):
        assert irqs.level(14)
        assert await fake_vp.inb(STATUS) & DRQ  # clears the interrupt
        assert not irqs.level(14)
        data += await read_block(fake_vp)
    assert data == pattern(1000) + pattern(1001) + pattern(1002)
    assert await fake_vp.inb(STATUS) == DRDY | DSC
    assert irqs.rising_edges(14) == 3


async def test_read_sectors_count_zero_means_256(disk: AtaDisk, fake_vp: FakeVP) -> None:
    """ATA/ATAPI-6, READ SECTORS: a Sector Count of 0 transfers 256 sectors (checked here by the range it needs)."""
    await issue(fake_vp, 0x20, lba=SECTORS - 255, count=0)
    assert await fake_vp.inb(STATUS) == DRDY | ERR
    assert await fake_vp.inb(ERROR) == IDNF
    await issue(fake_vp, 0x20, lba=SECTORS - 256, count=0)
    assert await fake_vp.inb(STATUS) & DRQ


async def test_read_sectors_chs(fake_vp: FakeVP) -> None:
    """ATA/ATAPI-6, CHS addressing (Device bit 6 clear): LBA = (C * heads + H) * sectors + S - 1."""
    cylinder, head, sector = 1, 2, 5
    await fake_vp.outb(DEVICE, 0xA0 | head)
    await fake_vp.outb(COUNT, 1)
    await fake_vp.outb(LBA_LOW, sector)
    await fake_vp.outb(LBA_MID, cylinder & 0xFF)
    await fake_vp.outb(LBA_HIGH, cylinder >> 8)
    await fake_vp.outb(STATUS, 0x20)
    assert await read_block(fake_vp) == pattern((cylinder * 16 + head) * 63 + sector - 1)


@pytest.mark.parametrize(("cylinder", "head", "sector"), [(4, 0, 1), (0, 0, 0), (0, 0, 64)])
async def test_chs_outside_the_geometry_is_idnf(fake_vp: FakeVP, cylinder: int, head: int, sector: int) -> None:
    """ATA/ATAPI-6, READ SECTORS error outputs: IDNF when the address is not on the media (cylinder past the last,
    sector 0, sector past the track)."""
    await fake_vp.outb(DEVICE, 0xA0 | head)
    await fake_vp.outb(LBA_LOW, sector)
    await fake_vp.outb(LBA_MID, cylinder)
    await fake_vp.outb(LBA_HIGH, 0)
    await fake_vp.outb(STATUS, 0x20)
    assert await fake_vp.inb(STATUS) == DRDY | ERR
    assert await fake_vp.inb(ERROR) == IDNF


async def test_lba_past_the_end_is_idnf(fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """ATA/ATAPI-6, READ SECTORS error outputs: IDNF when a requested sector is past the last user-addressable one."""
    await issue(fake_vp, 0x20, lba=SECTORS - 1, count=2)
    assert irqs.level(14)
    assert await fake_vp.inb(STATUS) == DRDY | ERR
    assert await fake_vp.inb(ERROR) == IDNF


async def test_write_sectors_data_out_protocol(disk: AtaDisk, fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """ATA/ATAPI-6, PIO data-out protocol: DRQ is set for the first block without an interrupt; each written
    block is followed by an interrupt, the last with DRQ clear."""
    await issue(fake_vp, 0x30, lba=7, count=2)
    assert not irqs.level(14)
    await write_block(fake_vp, b"\x11" * SECTOR_SIZE, how="outw")
    assert irqs.level(14) and await fake_vp.inb(STATUS) == DRDY | DSC | DRQ
    await write_block(fake_vp, b"\x22" * SECTOR_SIZE, how="rep outsl")
    assert irqs.level(14) and await fake_vp.inb(STATUS) == DRDY | DSC
    assert disk.read(7, 2) == b"\x11" * SECTOR_SIZE + b"\x22" * SECTOR_SIZE
    assert disk.read(9, 1) == pattern(9)


async def test_read_and_write_multiple(fake_vp: FakeVP, irqs: IrqRecorder, disk: AtaDisk) -> None:
    """ATA/ATAPI-6, READ MULTIPLE / WRITE MULTIPLE: aborted until SET MULTIPLE MODE enables
    them; then DRQ blocks hold the multiple count, the last block the rest; word 59 shows the setting."""
    await issue(fake_vp, 0xC4, lba=0, count=6)
    assert await fake_vp.inb(STATUS) == DRDY | ERR and await fake_vp.inb(ERROR) == ABRT
    await issue(fake_vp, 0xC6, count=4)
    assert await fake_vp.inb(STATUS) == DRDY | DSC
    assert (await identify(fake_vp))[59] == 0x0104
    edges = irqs.rising_edges(14)
    await issue(fake_vp, 0xC4, lba=10, count=6)
    assert await fake_vp.inb(STATUS) & DRQ
    assert await read_block(fake_vp, 4 * SECTOR_SIZE) == b"".join(pattern(i) for i in range(10, 14))
    assert await fake_vp.inb(STATUS) & DRQ
    assert await read_block(fake_vp, 2 * SECTOR_SIZE) == pattern(14) + pattern(15)
    assert await fake_vp.inb(STATUS) == DRDY | DSC
    assert irqs.rising_edges(14) - edges == 2
    await issue(fake_vp, 0xC5, lba=20, count=5)
    await write_block(fake_vp, b"\x33" * 4 * SECTOR_SIZE)
    assert await fake_vp.inb(STATUS) & DRQ
    await write_block(fake_vp, b"\x44" * SECTOR_SIZE)
    assert await fake_vp.inb(STATUS) == DRDY | DSC
    assert disk.read(20, 5) == b"\x33" * 4 * SECTOR_SIZE + b"\x44" * SECTOR_SIZE


@pytest.mark.parametrize("count", [3, 32])
async def test_set_multiple_rejects_unsupported_counts(fake_vp: FakeVP, count: int) -> None:
    """ATA/ATAPI-6, SET MULTIPLE MODE: a count that is not a power of two up to word 47's maximum aborts."""
    await issue(fake_vp, 0xC6, count=count)
    assert await fake_vp.inb(STATUS) == DRDY | ERR
    assert await fake_vp.inb(ERROR) == ABRT


async def test_48_bit_commands_on_a_disk_past_lba28(tmp_path: pathlib.Path) -> None:
    """ATA/ATAPI-6, 48-bit Address feature set: READ/WRITE SECTORS EXT take the high-order bytes from the
    registers' previous contents; a disk past 2^28 sectors reports 0FFFFFFFh in words 60-61 and its full
    size in words 100-103. The image is a sparse file mapped into memory."""
    path = tmp_path / "big.img"
    sectors = (1 << 28) + 64
    with path.open("wb") as f:
        f.truncate(sectors * SECTOR_SIZE)
    with AtaDisk(path) as disk:
        router = Router()
        router.include(AtaChannel(disk))
        async with partition(router) as running:
            vp = running.vp(0)
            words = await identify(vp)
            assert words[60] | words[61] << 16 == 0x0FFF_FFFF
            assert sum(words[100 + i] << 16 * i for i in range(4)) == sectors
            target = (1 << 28) + 5
            await issue_ext(vp, 0x34, lba=target, count=2)
            await write_block(vp, pattern(1) + pattern(2))
            assert await vp.inb(STATUS) == DRDY | DSC
            await issue_ext(vp, 0x24, lba=target + 1, count=1)
            assert await read_block(vp) == pattern(2)
            await issue_ext(vp, 0x24, lba=target, count=0x100)  # hob count 1, count 0: 256 sectors, too many
            assert await vp.inb(ERROR) == IDNF
            await issue_ext(vp, 0x27, lba=0, count=0)
            await vp.outb(CTRL, HOB)
            high = [await vp.inb(port) for port in (LBA_LOW, LBA_MID, LBA_HIGH)]
            await vp.outb(CTRL, 0)
            low = [await vp.inb(port) for port in (LBA_LOW, LBA_MID, LBA_HIGH)]
            assert sum(b << 8 * i for i, b in enumerate(low + high)) == sectors - 1
    with path.open("rb") as f:
        f.seek(target * SECTOR_SIZE)
        assert f.read(2 * SECTOR_SIZE) == pattern(1) + pattern(2)


async def test_hob_reads_back_the_previous_register_contents(fake_vp: FakeVP) -> None:
    """ATA/ATAPI-6, Device Control register, HOB: with HOB set, Sector Count and the LBA registers read the
    previously written (high-order) byte; any command block register write clears HOB."""
    for port, values in ((COUNT, (0x12, 0x34)), (LBA_LOW, (0x56, 0x78)), (LBA_HIGH, (0x9A, 0xBC))):
        for value in values:
            await fake_vp.outb(port, value)
    await fake_vp.outb(CTRL, HOB)
    assert [await fake_vp.inb(p) for p in (COUNT, LBA_LOW, LBA_HIGH)] == [0x12, 0x56, 0x9A]
    await fake_vp.outb(LBA_MID, 0)
    assert [await fake_vp.inb(p) for p in (COUNT, LBA_LOW, LBA_HIGH)] == [0x34, 0x78, 0xBC]


async def test_nien_masks_intrq(fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """ATA/ATAPI-6, Device Control register: with nIEN set the device releases INTRQ; clearing nIEN with an
    interrupt pending asserts it again."""
    await fake_vp.outb(CTRL, NIEN)
    await issue(fake_vp, 0xEC, device=0xA0)
    assert not irqs.level(14)
    await fake_vp.outb(CTRL, 0)
    assert irqs.level(14)
    await fake_vp.outb(CTRL, NIEN)
    assert not irqs.level(14)


async def test_software_reset(fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """ATA/ATAPI-6, software reset protocol: BSY while SRST is set; afterwards Status DRDY, Error 01h (diagnostic
    passed) and the ATA signature (count 01h, LBA 01h/00h/00h, device 00h), with no interrupt."""
    await issue(fake_vp, 0x20, lba=3, count=2)
    await fake_vp.outb(CTRL, NIEN | SRST)
    assert await fake_vp.inb(CTRL) & BSY
    await fake_vp.outb(CTRL, NIEN)
    assert await fake_vp.inb(STATUS) == DRDY | DSC
    assert [await fake_vp.inb(p) for p in range(ERROR, STATUS)] == [0x01, 0x01, 0x01, 0x00, 0x00, 0x00]
    await fake_vp.outb(CTRL, 0)
    assert not irqs.level(14)


async def test_execute_device_diagnostic(fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """ATA/ATAPI-6, EXECUTE DEVICE DIAGNOSTIC: Error 01h (device 0 passed, device 1 absent), the
    signature in the task file, and an interrupt from device 0."""
    await fake_vp.outb(DEVICE, 0xB0)
    await fake_vp.outb(STATUS, 0x90)
    assert irqs.level(14)
    assert await fake_vp.inb(DEVICE) == 0x00
    assert await fake_vp.inb(ERROR) == 0x01
    assert await fake_vp.inb(COUNT) == 0x01 and await fake_vp.inb(LBA_LOW) == 0x01


async def test_absent_device_1_reads_zero_status(fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """Device 1 absent: with DEV set, Status and Alternate Status read 00h while the shared task file reads
    back what was written (SeaBIOS's 55h/AAh probe passes, then IDENTIFY finds nothing): commands to it are
    ignored."""
    await fake_vp.outb(DEVICE, 0xB0)
    await fake_vp.outb(COUNT, 0x55)
    await fake_vp.outb(LBA_LOW, 0xAA)
    assert (await fake_vp.inb(COUNT), await fake_vp.inb(LBA_LOW), await fake_vp.inb(DEVICE)) == (0x55, 0xAA, 0xB0)
    assert await fake_vp.inb(STATUS) == 0 and await fake_vp.inb(CTRL) == 0
    await fake_vp.outb(STATUS, 0xEC)
    assert await fake_vp.inb(STATUS) == 0
    assert not irqs.level(14)
    await fake_vp.outb(DEVICE, 0xA0)
    assert await fake_vp.inb(STATUS) == DRDY | DSC


async def test_two_devices_share_the_task_file() -> None:
    """Both devices present: DEV selects whose Status, data and IDENTIFY the host sees; word 93 of device 0
    shows device 1 detected (bits 5:4), device 1's reports its own result in bits 12:8."""
    router = Router()
    router.include(AtaChannel([AtaDisk(image(64), model="ZERO"), AtaDisk(image(128), model="ONE")]))
    async with partition(router) as running:
        vp = running.vp(0)
        zero, one = await identify(vp, 0xA0), await identify(vp, 0xB0)
        assert ata_string(zero[27:47]) == "ZERO" and ata_string(one[27:47]) == "ONE"
        assert zero[93] & 0x0070 == 0x0030 and one[93] & 0x1F00 == 0x0B00
        assert zero[60] == 64 and one[60] == 128
        await issue(vp, 0x20, lba=100, count=1, device=0xF0)
        assert await read_block(vp) == pattern(100)


async def test_set_features(fake_vp: FakeVP) -> None:
    """ATA/ATAPI-6, SET FEATURES: 02h/82h enable/disable write cache (word 85 bit 5), AAh/55h read
    look-ahead (bit 6), 03h set transfer mode (PIO modes accepted, DMA modes aborted: none supported),
    unknown subcommands aborted."""
    await issue(fake_vp, 0xEF, features=0x82)
    assert await fake_vp.inb(STATUS) == DRDY | DSC
    await issue(fake_vp, 0xEF, features=0x55)
    assert (await identify(fake_vp))[85] & 0x0060 == 0
    await issue(fake_vp, 0xEF, features=0x02)
    await issue(fake_vp, 0xEF, features=0xAA)
    assert (await identify(fake_vp))[85] & 0x0060 == 0x0060
    await issue(fake_vp, 0xEF, features=0x03, count=0x0C)  # PIO mode 4
    assert await fake_vp.inb(STATUS) == DRDY | DSC
    await issue(fake_vp, 0xEF, features=0x03, count=0x42)  # UDMA mode 2
    assert await fake_vp.inb(STATUS) == DRDY | ERR and await fake_vp.inb(ERROR) == ABRT
    await issue(fake_vp, 0xEF, features=0x99)
    assert await fake_vp.inb(ERROR) == ABRT


async def test_initialize_device_parameters(fake_vp: FakeVP) -> None:
    """ATA/ATAPI-6, INITIALIZE DEVICE PARAMETERS: Sector Count gives sectors per track, Device bits 3:0
    the heads less one; IDENTIFY words 54-58 report the current translation, CHS commands use it."""
    await issue(fake_vp, 0x91, count=32, device=0xA0 | 7)
    assert await fake_vp.inb(STATUS) == DRDY | DSC
    words = await identify(fake_vp)
    assert (words[54], words[55], words[56]) == (SECTORS // 256, 8, 32)
    assert words[57] | words[58] << 16 == SECTORS // 256 * 256
    assert (words[1], words[3], words[6]) == (4, 16, 63)  # the default geometry is unchanged
    await issue(fake_vp, 0x20, lba=1 << 8 | 3, count=1, device=0xA0 | 2)  # C=1, H=2, S=3
    assert await read_block(fake_vp) == pattern((1 * 8 + 2) * 32 + 2)
    await issue(fake_vp, 0x91, count=0, device=0xA0)
    assert await fake_vp.inb(ERROR) == ABRT


async def test_non_data_commands_complete_with_an_interrupt(fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """ATA/ATAPI-6, non-data protocol: READ VERIFY SECTORS, SEEK, RECALIBRATE, FLUSH CACHE (EXT), IDLE
    IMMEDIATE, STANDBY IMMEDIATE each end with DRDY, no DRQ, one interrupt; CHECK POWER MODE reports FFh
    (active or idle) in Sector Count."""
    for command in (0x40, 0x70, 0x10, 0xE7, 0xEA, 0xE1, 0xE0):
        before = irqs.rising_edges(14)
        await issue(fake_vp, command, lba=5, count=2)
        assert irqs.rising_edges(14) == before + 1
        assert await fake_vp.inb(STATUS) == DRDY | DSC
    await issue(fake_vp, 0xE5, count=0)
    assert await fake_vp.inb(COUNT) == 0xFF


async def test_read_native_max_address(fake_vp: FakeVP) -> None:
    """ATA/ATAPI-6, READ NATIVE MAX ADDRESS: the highest LBA in the LBA registers and Device bits 3:0."""
    await issue(fake_vp, 0xF8, device=0xE0)
    assert await fake_vp.inb(STATUS) == DRDY | DSC
    top = [await fake_vp.inb(p) for p in (LBA_LOW, LBA_MID, LBA_HIGH, DEVICE)]
    assert top[0] | top[1] << 8 | top[2] << 16 | (top[3] & 0x0F) << 24 == SECTORS - 1


@pytest.mark.parametrize("command", [0x00, 0x08, 0xA0, 0xC8, 0xCA, 0xB0])
async def test_unsupported_commands_abort(fake_vp: FakeVP, irqs: IrqRecorder, command: int) -> None:
    """NOP (always aborts), DEVICE RESET and PACKET (packet devices only), READ/WRITE DMA (no DMA
    here) and SMART end with ERR and ABRT and an interrupt."""
    await issue(fake_vp, command)
    assert irqs.level(14)
    assert await fake_vp.inb(STATUS) == DRDY | ERR
    assert await fake_vp.inb(ERROR) == ABRT


async def test_a_command_during_a_transfer_is_ignored(fake_vp: FakeVP) -> None:
    """A command written while DRQ is set is not executed (the standard makes it indeterminate; QEMU ignores
    it); the transfer carries on."""
    await issue(fake_vp, 0x20, lba=2, count=1)
    await fake_vp.outb(STATUS, 0xEC)
    assert await read_block(fake_vp) == pattern(2)


async def test_byte_access_to_the_data_port(fake_vp: FakeVP) -> None:
    """The data register is 16 bits wide: an 8-bit read returns FFh and moves nothing (as in QEMU)."""
    await issue(fake_vp, 0x20, lba=4, count=1)
    assert await fake_vp.inb(DATA) == 0xFF
    assert await read_block(fake_vp) == pattern(4)


async def test_wide_access_to_the_8_bit_registers(fake_vp: FakeVP) -> None:
    """The other command block registers are 8 bits wide: a 16-bit OUT at 1F2h writes 1F2h and 1F3h; a
    32-bit IN at 1F4h reads 1F4h-1F7h (Status last)."""
    await fake_vp.outw(COUNT, 0x2211)
    assert (await fake_vp.inb(COUNT), await fake_vp.inb(LBA_LOW)) == (0x11, 0x22)
    await fake_vp.outb(LBA_MID, 0x33)
    await fake_vp.outb(LBA_HIGH, 0x44)
    assert await fake_vp.inl(LBA_MID) == (DRDY | DSC) << 24 | 0x00 << 16 | 0x4433


async def test_read_only_disk_aborts_writes() -> None:
    """A write command to read-only media is aborted before any data moves."""
    router = Router()
    router.include(AtaChannel(AtaDisk(image(64), read_only=True)))
    async with partition(router) as running:
        vp = running.vp(0)
        await issue(vp, 0x30, lba=1, count=1)
        assert await vp.inb(STATUS) == DRDY | ERR and await vp.inb(ERROR) == ABRT


def test_file_image_rounds_down_and_rejects_empty(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(0) + pattern(1) + b"tail")
    with AtaDisk(path, read_only=True) as disk:
        assert disk.sectors == 2 and disk.read(1, 1) == pattern(1)
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="not one 512-byte sector"):
        AtaDisk(path)
    with pytest.raises(ValueError, match="device 0"):
        AtaChannel([None, AtaDisk(image(1))])
