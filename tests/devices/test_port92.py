"""System Control Port A (0x92): fast A20 and fast reset, per the SMSC LPC47 "Port 92 Register" description."""

from __future__ import annotations

import pytest

from dispatcher import Router
from examples.port92 import Port92
from transports.testing import FakeVP

pytestmark = pytest.mark.anyio


class Events:
    def __init__(self) -> None:
        self.resets = 0
        self.a20: list[bool] = []

    def reset(self) -> None:
        self.resets += 1


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def port92(events: Events) -> Port92:
    return Port92(on_reset=events.reset, on_a20=events.a20.append)


@pytest.fixture
def router(port92: Port92) -> Router:
    router = Router()
    router.include(port92)
    return router


async def test_default_value_is_0x24(port92: Port92, fake_vp: FakeVP) -> None:
    """Port 92 Register, default value 24h: ALT_A20 and ALT_RST are 0; reserved bits 5 and 2 read 1."""
    assert await fake_vp.inb(0x92) == 0x24
    assert not port92.a20


async def test_bit1_gates_a20(port92: Port92, events: Events, fake_vp: FakeVP) -> None:
    """Bit 1 (ALT_A20): writing 1 drives ALT_A20 high, 0 low; the callback hears each change only."""
    await fake_vp.outb(0x92, 0x02)
    assert port92.a20 and await fake_vp.inb(0x92) == 0x26
    await fake_vp.outb(0x92, 0x02)
    await fake_vp.outb(0x92, 0x00)
    assert not port92.a20
    assert events.a20 == [True, False]
    assert events.resets == 0


async def test_bit0_pulses_reset_once_until_written_back_to_zero(
    port92: Port92, events: Events, fake_vp: FakeVP
) -> None:
    """Bit 0 (ALT_RST): writing 1 pulses reset; another pulse needs the bit back at 0 (a write or a system reset)."""
    await fake_vp.outb(0x92, 0x03)
    assert events.resets == 1 and port92.resets == 1
    await fake_vp.outb(0x92, 0x03)
    assert events.resets == 1
    await fake_vp.outb(0x92, 0x02)
    await fake_vp.outb(0x92, 0x03)
    assert events.resets == 2
    port92.reset()
    assert await fake_vp.inb(0x92) == 0x24
    assert events.a20 == [True, False]  # on at the first write, off at the system reset
    await fake_vp.outb(0x92, 0x01)
    assert events.resets == 3


async def test_reserved_bits_ignore_writes(fake_vp: FakeVP) -> None:
    """Bits 7:2 are reserved: they read 00100b whatever is written."""
    await fake_vp.outb(0x92, 0xD8 | 0x02)
    assert await fake_vp.inb(0x92) == 0x26


async def test_16_bit_access_is_split_into_bytes(fake_vp: FakeVP) -> None:
    """The register is 8 bits wide: a 16-bit IN at 0x92 reads 0x92 and the unclaimed 0x93 (all ones)."""
    assert await fake_vp.inw(0x92) == 0xFF24
