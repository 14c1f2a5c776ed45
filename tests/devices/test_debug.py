"""Debug ports: the debug console, POST codes and the exit device, driven as guest code drives them."""

from __future__ import annotations

import pytest

from dispatcher import Router
from examples.debug import DebugConsole, DebugExit, PostCodes
from transports.testing import FakePartition, FakeVP

pytestmark = pytest.mark.anyio


class Bench:
    def __init__(self) -> None:
        self.console = bytearray()
        self.exits: list[int] = []
        self.codes: list[int] = []
        self.router = Router()
        self.router.include(DebugConsole(self.console.extend, io_base=0x402))
        self.router.include(DebugConsole(self.console.extend, io_base=0xE9))
        self.post = PostCodes(on_code=self.codes.append)
        self.router.include(self.post)
        self.exit = DebugExit(on_exit=self.exits.append)
        self.router.include(self.exit)


@pytest.fixture
def bench() -> Bench:
    return Bench()


@pytest.fixture
def router(bench: Bench) -> Router:
    return bench.router


async def test_console_writes_reach_the_sink(bench: Bench, fake_vp: FakeVP) -> None:
    """QEMU isa-debugcon (hw/char/debugcon.c): each byte written to the port is output, at 0x402 and at 0xE9."""
    for byte in b"Sea":
        await fake_vp.outb(0x402, byte)
    await fake_vp.outb(0xE9, ord("!"))
    assert bytes(bench.console) == b"Sea!"


async def test_console_reads_answer_the_probe_value(fake_vp: FakeVP) -> None:
    """QEMU isa-debugcon: a read returns the readback value 0xE9, which SeaBIOS checks before using the port."""
    assert await fake_vp.inb(0x402) == 0xE9
    assert await fake_vp.inb(0xE9) == 0xE9


async def test_console_wider_writes_arrive_as_bytes(bench: Bench, fake_vp: FakeVP) -> None:
    """The console is 8 bits wide: a 16-bit OUT at 0x402 writes AL there and AH to the unclaimed 0x403."""
    await fake_vp.outw(0x402, 0x4241)
    assert bytes(bench.console) == b"A"
    assert await fake_vp.inw(0x402) == 0xFFE9  # 0x403 is unclaimed and reads all ones


async def test_post_codes_are_recorded_in_order_and_read_back(bench: Bench, fake_vp: FakeVP) -> None:
    """Port 0x80 POST codes: every write is recorded; a read returns the last code (a PIIX DMA page register)."""
    assert await fake_vp.inb(0x80) == 0
    for code in (0x01, 0x55, 0xAA):
        await fake_vp.outb(0x80, code)
    assert bench.post.codes == bench.codes == [0x01, 0x55, 0xAA]
    assert bench.post.last == 0xAA
    assert await fake_vp.inb(0x80) == 0xAA


@pytest.mark.parametrize(("value", "status"), [(0, 1), (1, 3), (0x31, 0x63)])
async def test_exit_status_is_value_shifted_left_or_one(bench: Bench, fake_vp: FakeVP, value: int, status: int) -> None:
    """QEMU isa-debug-exit (hw/misc/debugexit.c): a write of v exits with status (v << 1) | 1."""
    assert bench.exit.status is None
    await fake_vp.outb(0x501, value)
    assert bench.exit.status == status
    assert bench.exits == [status]


async def test_exit_takes_a_whole_16_bit_write_and_reads_zero(bench: Bench, fake_vp: FakeVP) -> None:
    """isa-debug-exit, iosize 2 at 0x501: one 16-bit write is one request with the whole value; reads return 0."""
    await fake_vp.outw(0x501, 0x0102)
    assert bench.exits == [0x0205]
    assert await fake_vp.inw(0x501) == 0
    assert await fake_vp.inb(0x503) == 0xFF  # past iosize: not the device's


async def test_exit_alias_at_0xf4() -> None:
    """isa-debug-exit configured as iobase=0xf4, iosize=4 (the common test-harness setting)."""
    exits: list[int] = []
    router = Router()
    claims = router.include(DebugExit(io_base=0xF4, size=4, on_exit=exits.append))
    assert [(c.first, c.last) for c in claims] == [(0xF4, 0xF7)]
    async with FakePartition(router) as partition:
        await partition.vp(0).outl(0xF4, 0x10)
    assert exits == [0x21]


def test_exit_rejects_an_impossible_size() -> None:
    with pytest.raises(ValueError, match="size must be 1, 2 or 4"):
        DebugExit(size=3)
