"""PCI configuration mechanism #1 and function config space, from the PCI Local Bus Specification 3.0
(3.2.2.3.2 configuration mechanism #1; 6.1 header; 6.2.2 command/status; 6.2.5 base addresses) and Intel's
chipset datasheets (CONFIG_ADDRESS is dword-only; the PIIX reset control register at 0xCF9)."""

from __future__ import annotations

import pytest

from dispatcher import Router
from examples.pci import PciFunction, PciHost
from transports.testing import FakeVP

pytestmark = pytest.mark.anyio

ADDR, DATA = 0xCF8, 0xCFC


def cfg(bus: int, device: int, function: int, register: int) -> int:
    return 0x8000_0000 | bus << 16 | device << 11 | function << 8 | register


class Resets:
    def __init__(self) -> None:
        self.hard: list[bool] = []


@pytest.fixture
def resets() -> Resets:
    return Resets()


@pytest.fixture
def nic() -> PciFunction:
    function = PciFunction(0x10EC, 0x8139, class_code=0x020000, revision=0x20, interrupt_pin=1)
    function.add_bar(0, 0x100, io=True)
    function.add_bar(1, 0x1000)
    function.add_bar(2, 0x10_0000, wide=True, prefetchable=True)
    function.add_rom(0x10000)
    return function


@pytest.fixture
def host(nic: PciFunction, resets: Resets) -> PciHost:
    host = PciHost(on_reset=resets.hard.append)
    host.add(nic, 3)
    return host


@pytest.fixture
def router(host: PciHost) -> Router:
    router = Router()
    router.include(host)
    return router


async def read(vp: FakeVP, address: int, size: int = 4) -> int:
    await vp.outl(ADDR, address & ~3)
    port = DATA + (address & 3)
    return await (vp.inl(port) if size == 4 else vp.inw(port) if size == 2 else vp.inb(port))


async def write(vp: FakeVP, address: int, value: int, size: int = 4) -> None:
    await vp.outl(ADDR, address & ~3)
    port = DATA + (address & 3)
    await (vp.outl(port, value) if size == 4 else vp.outw(port, value) if size == 2 else vp.outb(port, value))


async def test_host_bridge_identity(fake_vp: FakeVP) -> None:
    """Intel 82441FX datasheet, PCI configuration registers: VID 8086h, DID 1237h at 00:00.0, RID 02h,
    class 060000h (host bridge)."""
    await fake_vp.outl(ADDR, 0x8000_0000)
    assert await fake_vp.inl(DATA) == 0x1237_8086
    assert await read(fake_vp, cfg(0, 0, 0, 0x08)) == 0x0600_0002
    assert await read(fake_vp, cfg(0, 0, 0, 0x04)) == 0x0280_0006  # PCICMD 0006h, PCISTS 0280h
    assert await read(fake_vp, cfg(0, 0, 0, 0x0E), 1) == 0x00  # single-function header


async def test_config_address_reads_back_without_reserved_bits(fake_vp: FakeVP) -> None:
    """PCI 3.0, 3.2.2.3.2: CONFIG_ADDRESS is read/write; bits 30:24 are reserved and bits 1:0 read 0."""
    assert await fake_vp.inl(ADDR) == 0
    await fake_vp.outl(ADDR, 0xFFFF_FFFF)
    assert await fake_vp.inl(ADDR) == 0x80FF_FFFC
    await fake_vp.outl(ADDR, 0x8000_1810)
    assert await fake_vp.inl(ADDR) == 0x8000_1810


async def test_byte_and_word_accesses_pass_through(host: PciHost, fake_vp: FakeVP) -> None:
    """Intel chipset datasheets, CONFIG_ADDRESS: "accessed only as a Dword; a Byte or Word reference passes
    through ... onto the PCI bus as an I/O cycle": it neither changes nor reads the register (no device
    answers here, so all ones)."""
    await fake_vp.outl(ADDR, 0x8000_0000)
    await fake_vp.outb(ADDR, 0x12)
    await fake_vp.outw(0xCFA, 0x3456)
    assert host.address == 0x8000_0000
    assert await fake_vp.inb(ADDR) == 0xFF
    assert await fake_vp.inw(0xCFA) == 0xFFFF
    assert await fake_vp.inl(DATA) == 0x1237_8086


async def test_reset_control_register_at_0xcf9(resets: Resets, fake_vp: FakeVP) -> None:
    """PIIX reset control register (I/O 0CF9h, byte): bit 1 selects a hard reset, bit 2 set resets the system."""
    assert await fake_vp.inb(0xCF9) == 0x00
    await fake_vp.outb(0xCF9, 0x02)
    assert await fake_vp.inb(0xCF9) == 0x02
    assert resets.hard == []
    await fake_vp.outb(0xCF9, 0x06)
    assert resets.hard == [True]
    await fake_vp.outb(0xCF9, 0x04)
    assert resets.hard == [True, False]
    assert await fake_vp.inw(ADDR) == 0x00FF  # 0xCF8 passes through (all ones), 0xCF9 holds 00h


async def test_data_port_every_width_and_offset(fake_vp: FakeVP) -> None:
    """PCI 3.0, 3.2.2.3.2: CONFIG_DATA 0CFCh-0CFFh reaches the selected dword; byte enables pick its bytes."""
    await fake_vp.outl(ADDR, cfg(0, 0, 0, 0))
    assert [await fake_vp.inb(DATA + i) for i in range(4)] == [0x86, 0x80, 0x37, 0x12]
    assert await fake_vp.inw(DATA) == 0x8086
    assert await fake_vp.inw(DATA + 2) == 0x1237
    assert await fake_vp.inw(DATA + 1) == 0x3780


async def test_dword_at_0xcfe_spills_into_unclaimed_ports(fake_vp: FakeVP) -> None:
    """A dword IN at 0CFEh covers 0CFEh-0D01h: the last two ports belong to nobody and read all ones."""
    await fake_vp.outl(ADDR, cfg(0, 0, 0, 0))
    assert await fake_vp.inl(DATA + 2) == 0xFFFF_1237


async def test_absent_functions_and_disabled_cycles_read_all_ones(fake_vp: FakeVP) -> None:
    """PCI 3.0, 6.1: a read of a function that does not exist ends in master abort: all ones. With the enable
    bit clear, 0CFCh is an ordinary I/O port (unanswered here); writes there are dropped."""
    assert await read(fake_vp, cfg(0, 7, 0, 0)) == 0xFFFF_FFFF
    assert await read(fake_vp, cfg(1, 0, 0, 0)) == 0xFFFF_FFFF
    assert await read(fake_vp, cfg(0, 0, 1, 0), 2) == 0xFFFF
    await fake_vp.outl(ADDR, 0x0000_0000)
    assert await fake_vp.inl(DATA) == 0xFFFF_FFFF
    await fake_vp.outl(DATA, 0)
    assert await read(fake_vp, cfg(0, 0, 0, 0)) == 0x1237_8086


async def test_read_only_fields_ignore_writes(fake_vp: FakeVP) -> None:
    """PCI 3.0, 6.1: Vendor ID, Device ID, Revision ID and Class Code are read-only."""
    for register in (0x00, 0x08):
        before = await read(fake_vp, cfg(0, 3, 0, register))
        await write(fake_vp, cfg(0, 3, 0, register), 0)
        assert await read(fake_vp, cfg(0, 3, 0, register)) == before


async def test_command_register_writable_bits(fake_vp: FakeVP) -> None:
    """PCI 3.0, 6.2.2: Command register bits I/O space (0), memory space (1), bus master (2), parity error
    response (6), SERR# (8), interrupt disable (10) are writable; reserved bits 15:11 read 0."""
    await write(fake_vp, cfg(0, 3, 0, 0x04), 0xFFFF, 2)
    assert await read(fake_vp, cfg(0, 3, 0, 0x04), 2) == 0x0547


async def test_status_error_bits_are_write_one_to_clear(host: PciHost, nic: PciFunction, fake_vp: FakeVP) -> None:
    """PCI 3.0, 6.2.3: Status register error bits are cleared by writing 1; writing 0 leaves them."""
    nic.set(0x06, 2, 0x2010, w1cmask=0xF900)  # received master abort (13) set; capabilities (4) read-only
    await write(fake_vp, cfg(0, 3, 0, 0x06), 0x0000, 2)
    assert await read(fake_vp, cfg(0, 3, 0, 0x06), 2) == 0x2010
    await write(fake_vp, cfg(0, 3, 0, 0x06), 0xFFFF, 2)
    assert await read(fake_vp, cfg(0, 3, 0, 0x06), 2) == 0x0010


async def test_interrupt_line_is_writable_and_pin_is_not(fake_vp: FakeVP) -> None:
    """PCI 3.0, 6.2.4: Interrupt Line is read/write scratch for software; Interrupt Pin is read-only."""
    await write(fake_vp, cfg(0, 3, 0, 0x3C), 0xFFFF, 2)
    assert await read(fake_vp, cfg(0, 3, 0, 0x3C), 2) == 0x01FF


async def test_io_bar_sizing(nic: PciFunction, fake_vp: FakeVP) -> None:
    """PCI 3.0, 6.2.5.1: write all ones to an I/O BAR and read back the size mask with bit 0 set; the
    programmed base then reads back and is what the device decodes."""
    assert await read(fake_vp, cfg(0, 3, 0, 0x10)) == 0x0000_0001
    await write(fake_vp, cfg(0, 3, 0, 0x10), 0xFFFF_FFFF)
    assert await read(fake_vp, cfg(0, 3, 0, 0x10)) == 0xFFFF_FF01  # 256 bytes
    await write(fake_vp, cfg(0, 3, 0, 0x10), 0xC123)
    assert await read(fake_vp, cfg(0, 3, 0, 0x10)) == 0xC101
    assert nic.bar_address(0) == 0xC100


async def test_memory_bar_sizing(nic: PciFunction, fake_vp: FakeVP) -> None:
    """PCI 3.0, 6.2.5.1: a 32-bit memory BAR reads back ~(size - 1) with its type bits 3:0 (0000b)."""
    await write(fake_vp, cfg(0, 3, 0, 0x14), 0xFFFF_FFFF)
    assert await read(fake_vp, cfg(0, 3, 0, 0x14)) == 0xFFFF_F000
    await write(fake_vp, cfg(0, 3, 0, 0x14), 0xFEBF_1000)
    assert nic.bar_address(1) == 0xFEBF_1000


async def test_64_bit_prefetchable_bar_sizing(nic: PciFunction, fake_vp: FakeVP) -> None:
    """PCI 3.0, 6.2.5.1: a 64-bit BAR (type 10b, prefetchable bit 3) spans two registers; sizing both halves
    reads back the 64-bit mask."""
    assert await read(fake_vp, cfg(0, 3, 0, 0x18)) == 0x0000_000C
    await write(fake_vp, cfg(0, 3, 0, 0x18), 0xFFFF_FFFF)
    await write(fake_vp, cfg(0, 3, 0, 0x1C), 0xFFFF_FFFF)
    assert await read(fake_vp, cfg(0, 3, 0, 0x18)) == 0xFFF0_000C
    assert await read(fake_vp, cfg(0, 3, 0, 0x1C)) == 0xFFFF_FFFF
    await write(fake_vp, cfg(0, 3, 0, 0x18), 0x0010_0000)
    await write(fake_vp, cfg(0, 3, 0, 0x1C), 0x0000_0008)
    assert nic.bar_address(2) == 0x8_0010_0000


async def test_unimplemented_bar_reads_zero(fake_vp: FakeVP) -> None:
    """PCI 3.0, 6.2.5.1: an unimplemented BAR is hardwired to zero; sizing it reads 0."""
    await write(fake_vp, cfg(0, 3, 0, 0x24), 0xFFFF_FFFF)
    assert await read(fake_vp, cfg(0, 3, 0, 0x24)) == 0


async def test_rom_bar_sizing(fake_vp: FakeVP) -> None:
    """PCI 3.0, 6.2.5.2: the expansion ROM BAR sizes from bit 11 up; bit 0 is the ROM enable bit."""
    await write(fake_vp, cfg(0, 3, 0, 0x30), 0xFFFF_FFFF)
    assert await read(fake_vp, cfg(0, 3, 0, 0x30)) == 0xFFFF_0001


async def test_bar_byte_writes_compose(nic: PciFunction, fake_vp: FakeVP) -> None:
    """Byte writes through 0CFCh-0CFFh reach a BAR one byte at a time with the same masking."""
    for i, byte in enumerate((0x23, 0xC1, 0x00, 0x00)):
        await write(fake_vp, cfg(0, 3, 0, 0x10 + i), byte, 1)
    assert nic.bar_address(0) == 0xC100


async def test_multi_function_bit_set_on_function_zero(host: PciHost) -> None:
    """PCI 3.0, 6.2.1: Header Type bit 7 on function 0 marks a multi-function device; software scans
    functions 1-7 only when it is set."""
    host.add(PciFunction(0x8086, 0x7010, class_code=0x010180), 3, 1)
    assert host.read_config(0, 3, 0, 0x0E, 1) == 0x80
    assert host.read_config(0, 3, 1, 0x0E, 1) == 0x00


def test_bad_configuration_is_refused(host: PciHost) -> None:
    function = PciFunction(0x1234, 0x0001)
    with pytest.raises(ValueError, match="power of two"):
        function.add_bar(0, 0x300, io=True)
    with pytest.raises(ValueError, match="power of two"):
        function.add_bar(0, 0x200, io=True)  # more than 256 bytes of I/O
    with pytest.raises(ValueError, match="does not exist"):
        function.add_bar(5, 0x1000, wide=True)
    function.add_bar(0, 0x1000, wide=True)
    with pytest.raises(ValueError, match="already in use"):
        function.add_bar(1, 0x1000)
    with pytest.raises(ValueError, match="already occupied"):
        host.add(function, 3)
    with pytest.raises(ValueError, match="not a PCI address"):
        host.add(function, 32)
