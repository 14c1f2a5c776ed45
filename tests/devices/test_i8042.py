"""The i8042 PS/2 controller at 0x60/0x64, its keyboard and mouse, written from the IBM PS/2 Hardware
Interface Technical Reference ("Keyboard/Auxiliary Device Controller") and the PS/2 keyboard and mouse
command sets."""

from __future__ import annotations

import pytest

from dispatcher import IrqRecorder, Router
from examples.i8042 import I8042
from transports.testing import FakeVP

pytestmark = pytest.mark.anyio

DATA, STATUS = 0x60, 0x64
OBF, SYS, CMD, UNLOCKED, AUX_OBF = 0x01, 0x04, 0x08, 0x10, 0x20


class Events:
    def __init__(self) -> None:
        self.resets = 0
        self.a20: list[bool] = []

    def reset(self) -> None:
        self.resets += 1


@pytest.fixture
def irqs() -> IrqRecorder:
    return IrqRecorder()


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def kbc(irqs: IrqRecorder, events: Events) -> I8042:
    return I8042(irq=irqs.line(1), aux_irq=irqs.line(12), on_reset=events.reset, on_a20=events.a20.append)


@pytest.fixture
def router(kbc: I8042) -> Router:
    router = Router()
    router.include(kbc)
    return router


async def command(vp: FakeVP, cmd: int, *data: int) -> None:
    """What a driver does: wait for IBF clear, write the command, then each data byte."""
    assert not await vp.inb(STATUS) & 0x02
    await vp.outb(STATUS, cmd)
    for byte in data:
        assert not await vp.inb(STATUS) & 0x02
        await vp.outb(DATA, byte)


async def read_all(vp: FakeVP) -> list[int]:
    out = []
    while await vp.inb(STATUS) & OBF:
        out.append(await vp.inb(DATA))
    return out


async def test_power_on_status(fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """Status register after power-on: keyboard not inhibited (bit 4), last write a command (bit 3), nothing
    buffered (OBF 0), input buffer empty (IBF 0), system flag 0 until the self-test."""
    assert await fake_vp.inb(STATUS) == UNLOCKED | CMD
    assert irqs.events == []


async def test_self_test_answers_0x55_and_sets_the_system_flag(fake_vp: FakeVP) -> None:
    """Command AAh (self-test): 55h is placed in the output buffer; the system flag (status bit 2) is set."""
    await command(fake_vp, 0xAA)
    status = await fake_vp.inb(STATUS)
    assert status & OBF and status & SYS and not status & AUX_OBF
    assert await fake_vp.inb(DATA) == 0x55
    assert not await fake_vp.inb(STATUS) & OBF


@pytest.mark.parametrize(("cmd", "reply"), [(0xAB, 0x00), (0xA9, 0x00), (0xA4, 0xF1), (0xC0, 0x80), (0xE0, 0x00)])
async def test_tests_and_input_port_reads(fake_vp: FakeVP, cmd: int, reply: int) -> None:
    """Commands ABh (keyboard interface test: 00h no error), A9h (auxiliary interface test: 00h), A4h (password
    installed test: F1h, none), C0h (read input port), E0h (read test inputs)."""
    await command(fake_vp, cmd)
    assert await read_all(fake_vp) == [reply]


async def test_command_byte_read_and_write(kbc: I8042, fake_vp: FakeVP) -> None:
    """Commands 20h/60h: read and write the controller command byte (RAM byte 0); bit 2 is the system flag."""
    await command(fake_vp, 0x20)
    assert await read_all(fake_vp) == [0x03]
    await command(fake_vp, 0x60, 0x65)
    assert kbc.command_byte == 0x65
    await command(fake_vp, 0x20)
    assert await read_all(fake_vp) == [0x65]
    assert await fake_vp.inb(STATUS) & SYS
    await command(fake_vp, 0x60, 0x61)
    assert not await fake_vp.inb(STATUS) & SYS


async def test_controller_ram_bytes(fake_vp: FakeVP) -> None:
    """Commands 21h-3Fh / 61h-7Fh read and write the controller's internal RAM bytes 1-1Fh."""
    await command(fake_vp, 0x7F, 0x5A)
    await command(fake_vp, 0x3F)
    assert await read_all(fake_vp) == [0x5A]


async def test_status_bit3_tracks_the_last_port_written(fake_vp: FakeVP) -> None:
    """Status bit 3 (command/data): 1 after a write to 64h, 0 after a write to 60h."""
    await command(fake_vp, 0x60, 0x01)
    assert not await fake_vp.inb(STATUS) & CMD
    await fake_vp.outb(STATUS, 0xAE)
    assert await fake_vp.inb(STATUS) & CMD


async def test_output_port_a20_and_reset(kbc: I8042, events: Events, fake_vp: FakeVP) -> None:
    """Commands D0h/D1h: read and write the output port; bit 1 is the A20 gate, bit 0 low resets the CPU."""
    await command(fake_vp, 0xD0)
    assert await read_all(fake_vp) == [0xCF]
    assert kbc.a20
    await command(fake_vp, 0xD1, 0xCD)
    assert not kbc.a20 and events.a20 == [False] and events.resets == 0
    await command(fake_vp, 0xD1, 0xCF)
    assert kbc.a20 and events.a20 == [False, True]
    await command(fake_vp, 0xD1, 0xCE)
    assert events.resets == 1


async def test_output_port_reflects_the_interrupt_outputs(kbc: I8042, fake_vp: FakeVP) -> None:
    """Output port bit 4 is the keyboard OBF interrupt, bit 5 the auxiliary one."""
    await command(fake_vp, 0xD2, 0x11)  # keyboard data waiting: IRQ 1 asserted
    await command(fake_vp, 0xD0)
    # The D0h reply queues behind the byte already in the buffer.
    assert await fake_vp.inb(DATA) == 0x11
    assert await fake_vp.inb(DATA) == 0xCF | 0x10


async def test_a20_commands_dd_df(kbc: I8042, fake_vp: FakeVP) -> None:
    """Commands DDh/DFh (A20 off/on, as the HP Vectra controllers and QEMU implement them)."""
    await command(fake_vp, 0xDD)
    assert not kbc.a20
    await command(fake_vp, 0xDF)
    assert kbc.a20


@pytest.mark.parametrize(("cmd", "resets"), [(0xFE, 1), (0xF0, 1), (0xFF, 0), (0xFD, 0)])
async def test_pulse_commands(events: Events, fake_vp: FakeVP, cmd: int, resets: int) -> None:
    """Commands F0h-FFh pulse output port bits 0-3 low where the command's bit is 0; bit 0 is CPU reset."""
    await command(fake_vp, cmd)
    assert events.resets == resets


async def test_keyboard_reset_answers_ack_then_bat(fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """Keyboard command FFh (reset): FAh (acknowledge) then AAh (BAT completion), each raising IRQ 1 while
    command byte bit 0 is set; reading port 60h lowers the line, and the next byte raises it again, so an
    edge-triggered PIC sees one interrupt per byte."""
    await fake_vp.outb(DATA, 0xFF)
    assert irqs.level(1)
    assert await fake_vp.inb(DATA) == 0xFA
    assert irqs.level(1)  # the next byte is already in the buffer
    assert await fake_vp.inb(DATA) == 0xAA
    assert not irqs.level(1)
    assert irqs.rising_edges(1) == 2 and not irqs.level(12)


async def test_irq1_needs_command_byte_bit0(fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """Command byte bit 0 (enable keyboard interrupt): with it clear, OBF is set but IRQ 1 is not raised."""
    await command(fake_vp, 0x60, 0x00)
    await fake_vp.outb(DATA, 0xF2)
    assert await fake_vp.inb(STATUS) & OBF
    assert not irqs.level(1)
    await command(fake_vp, 0x60, 0x01)  # enabling with data waiting raises the line
    assert irqs.level(1)
    assert await read_all(fake_vp) == [0xFA, 0xAB, 0x83]
    assert not irqs.level(1)


async def test_keyboard_commands_seabios_sends(kbc: I8042, fake_vp: FakeVP) -> None:
    """PS/2 keyboard commands F5h (default disable), F0h (scan code set, 00h reports it), EDh (LEDs), F3h
    (typematic), EEh (echo), F4h (enable): acknowledged with FAh, parameters too; EEh answers EEh."""
    replies = []
    for byte in (0xF5, 0xF0, 0x01, 0xF0, 0x00, 0xED, 0x07, 0xF3, 0x20, 0xEE, 0xF4):
        await fake_vp.outb(DATA, byte)
        replies.append(await read_all(fake_vp))
    assert replies == [[0xFA]] * 4 + [[0xFA, 0x01]] + [[0xFA]] * 4 + [[0xEE], [0xFA]]
    assert kbc.keyboard.scancode_set == 1 and kbc.keyboard.leds == 7 and kbc.keyboard.typematic == 0x20


async def test_enable_clears_the_keyboard_output(kbc: I8042, fake_vp: FakeVP) -> None:
    """Keyboard F4h (enable) clears the keyboard's output buffer before acknowledging."""
    await command(fake_vp, 0xAD)
    kbc.keyboard.send(b"\x1c\x1c")
    await fake_vp.outb(DATA, 0xF4)
    assert await read_all(fake_vp) == [0xFA]


async def test_keyboard_unknown_command_and_resend(fake_vp: FakeVP) -> None:
    """An invalid keyboard command is answered FEh (resend); FEh from the host repeats the last byte sent."""
    await fake_vp.outb(DATA, 0x01)
    await fake_vp.outb(DATA, 0xF2)
    await fake_vp.outb(DATA, 0xFE)
    assert await read_all(fake_vp) == [0xFE, 0xFA, 0xAB, 0x83, 0x83]


async def test_scan_codes_arrive_only_while_scanning(kbc: I8042, fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """A keyboard sends keystrokes only with scanning enabled (F4h); F5h disables it."""
    kbc.keyboard.send(b"\x1c\xf0\x1c")
    assert irqs.level(1)
    assert await read_all(fake_vp) == [0x1C, 0xF0, 0x1C]
    await fake_vp.outb(DATA, 0xF5)
    assert await read_all(fake_vp) == [0xFA]
    kbc.keyboard.send(b"\x1c")
    assert await read_all(fake_vp) == []


async def test_disabling_the_keyboard_port_holds_its_data(kbc: I8042, fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """Commands ADh/AEh: with the keyboard interface disabled (command byte bit 4) nothing of the keyboard's
    reaches the output buffer; enabling it delivers what waited."""
    await command(fake_vp, 0xAD)
    assert kbc.command_byte & 0x10
    kbc.keyboard.send(b"\x1c")
    assert not await fake_vp.inb(STATUS) & OBF and not irqs.level(1)
    await command(fake_vp, 0xAE)
    assert await read_all(fake_vp) == [0x1C]


async def test_writing_to_the_keyboard_reenables_its_port(kbc: I8042, fake_vp: FakeVP) -> None:
    """A byte written to 60h goes to the keyboard, which re-enables the keyboard interface (as QEMU does)."""
    await command(fake_vp, 0xAD)
    await fake_vp.outb(DATA, 0xEE)
    assert not kbc.command_byte & 0x10
    assert await read_all(fake_vp) == [0xEE]


async def test_mouse_through_d4_raises_irq12(kbc: I8042, fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """Command D4h writes the next byte to the auxiliary device; its replies set status bit 5 and raise
    IRQ 12 (command byte bit 1). Mouse FFh answers FAh AAh 00h; F2h answers FAh 00h."""
    await command(fake_vp, 0xA8)
    await command(fake_vp, 0xD4, 0xFF)
    assert irqs.level(12) and not irqs.level(1)
    assert await fake_vp.inb(STATUS) & (OBF | AUX_OBF) == OBF | AUX_OBF
    assert await read_all(fake_vp) == [0xFA, 0xAA, 0x00]
    assert not irqs.level(12)
    await command(fake_vp, 0xD4, 0xF2)
    assert await read_all(fake_vp) == [0xFA, 0x00]


async def test_mouse_settings_and_status_request(kbc: I8042, fake_vp: FakeVP) -> None:
    """PS/2 mouse E8h (resolution), F3h (sample rate), E7h (2:1 scaling), F4h (enable), E9h (status request:
    status byte, resolution, sample rate), then a movement packet in stream mode."""
    replies = []
    for byte in (0xE8, 0x03, 0xF3, 0x28, 0xE7, 0xF4, 0xE9):
        await command(fake_vp, 0xD4, byte)
        replies.append(await read_all(fake_vp))
    assert replies == [[0xFA]] * 6 + [[0xFA, 0x30, 0x03, 0x28]]
    kbc.mouse.move(-3, 5, buttons=0x01)
    assert await read_all(fake_vp) == [0x08 | 0x10 | 0x01, 0xFD, 0x05]


async def test_mouse_port_disabled_holds_mouse_data(kbc: I8042, fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """Commands A7h/A8h: with the auxiliary interface disabled (command byte bit 5), mouse data waits."""
    await command(fake_vp, 0xA7)
    assert kbc.command_byte & 0x20
    await command(fake_vp, 0xD4, 0xF2)
    assert not await fake_vp.inb(STATUS) & OBF and not irqs.level(12)
    await command(fake_vp, 0xA8)
    assert await read_all(fake_vp) == [0xFA, 0x00]


async def test_d2_d3_write_the_output_buffer(fake_vp: FakeVP, irqs: IrqRecorder) -> None:
    """Commands D2h/D3h place the next byte in the output buffer as keyboard or auxiliary data."""
    await command(fake_vp, 0xD3, 0x42)
    assert irqs.level(12) and await fake_vp.inb(STATUS) & AUX_OBF
    assert await fake_vp.inb(DATA) == 0x42
    await command(fake_vp, 0xD2, 0x43)
    assert irqs.level(1) and not await fake_vp.inb(STATUS) & AUX_OBF
    assert await fake_vp.inb(DATA) == 0x43


async def test_a_new_command_cancels_a_pending_data_byte(kbc: I8042, fake_vp: FakeVP) -> None:
    """A command written while a previous one waits for its data byte replaces it."""
    await fake_vp.outb(STATUS, 0x60)
    await fake_vp.outb(STATUS, 0xAA)
    assert await read_all(fake_vp) == [0x55]
    await fake_vp.outb(DATA, 0xEE)  # goes to the keyboard, not the command byte
    assert kbc.command_byte == 0x07
    assert await read_all(fake_vp) == [0xEE]


async def test_reading_an_empty_buffer_returns_the_last_byte(fake_vp: FakeVP) -> None:
    """Reading 60h with OBF clear returns the stale buffer contents and changes nothing."""
    await command(fake_vp, 0xAA)
    assert await fake_vp.inb(DATA) == 0x55
    assert await fake_vp.inb(DATA) == 0x55
    assert not await fake_vp.inb(STATUS) & OBF


async def test_unknown_controller_command_is_ignored(fake_vp: FakeVP) -> None:
    """An undefined controller command produces nothing."""
    await command(fake_vp, 0xB5)
    assert await read_all(fake_vp) == []


async def test_wide_access_reaches_the_byte_ports(fake_vp: FakeVP) -> None:
    """The controller's ports are 8 bits wide: a 16-bit IN at 64h reads the status and the unclaimed 65h."""
    assert await fake_vp.inw(STATUS) == 0xFF00 | UNLOCKED | CMD
