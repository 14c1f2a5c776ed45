"""The i8042 PS/2 controller at 0x60/0x64 with a keyboard and a mouse behind it.

Ports (offsets from ``io_base``, 0x60 by default):

=====  ===========================  ============================================
off    read                         write
=====  ===========================  ============================================
0      output buffer (data)         data: to the keyboard, or a command's byte
4      status register              controller command
=====  ===========================  ============================================

Status bits: 0 OBF, 1 IBF (always 0: commands take no time here), 2 system
flag, 3 last write was a command, 4 keyboard not inhibited, 5 OBF holds
mouse data, 6 timeout, 7 parity error.

Controller commands: 0x20-0x3F read RAM (byte 0 is the command byte),
0x60-0x7F write RAM, 0xA4 password test (0xF1: none), 0xA7/0xA8 disable and
enable the mouse port, 0xA9 mouse port test (0x00), 0xAA self-test (0x55,
sets the system flag), 0xAB keyboard port test (0x00), 0xAD/0xAE disable and
enable the keyboard port, 0xC0 read input port, 0xD0/0xD1 read and write
the output port (bit 0 low resets the CPU, bit 1 is A20), 0xD2/0xD3 write the
keyboard/mouse output buffer, 0xD4 write to the mouse, 0xDD/0xDF A20 off/on,
0xE0 read test inputs, 0xF0-0xFF pulse output port bits 0-3 low (0xFE resets).
Unknown commands are ignored, as on real controllers.

The output buffer holds one byte; controller replies come first, then the
keyboard's bytes, then the mouse's, each device only while its port is
enabled (command byte bits 4 and 5). IRQ 1 is raised while the buffer holds
keyboard data and command byte bit 0 is set; IRQ 12 likewise for mouse data
and bit 1. Reading port 0x60 empties the buffer and lowers the line, so
the next byte raises it again: an edge-triggered PIC sees one request per
byte.

Not modelled: scan code translation (command byte bit 6 is kept and read
back, but :meth:`Ps2Keyboard.send` bytes reach the guest as given) and
timing (every reply is ready at once).

Device state (kind ``i8042``, version 1): the controller's RAM, output port,
output buffer and queued replies, the command waiting for its data byte, and
the keyboard's and mouse's settings and the bytes they have queued.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from dispatcher import IrqLine, PortAccess, StateFields, on_port

__all__ = ["I8042", "Ps2Keyboard", "Ps2Mouse"]

# Status register
OBF, IBF, SYS, CMD, UNLOCKED, AUX_OBF = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
# Command byte
KBD_INT, AUX_INT, KBD_DISABLED, AUX_DISABLED = 0x01, 0x02, 0x10, 0x20
# Output port
OUT_RESET, OUT_A20, OUT_KBD_OBF, OUT_AUX_OBF = 0x01, 0x02, 0x10, 0x20
# Device replies
ACK, RESEND, BAT_OK = 0xFA, 0xFE, 0xAA

_QUEUE_LIMIT = 1 << 16  # bytes a saved device queue may hold
_FLAG = -1
# Commands that take one data byte at port 0x60.
_TAKES_DATA = frozenset(range(0x60, 0x80)) | {0xD1, 0xD2, 0xD3, 0xD4}


class _Ps2Device:
    """What a keyboard and a mouse share: an output queue and commands with one parameter byte."""

    # Commands followed by a parameter byte, answered ACK then ACK.
    PARAMETER_COMMANDS: frozenset[int] = frozenset()
    REPORTING_AT_POWER_ON = False

    def __init__(self) -> None:
        self.output: deque[int] = deque()
        self.reporting = self.REPORTING_AT_POWER_ON
        # Set by the controller: called when the device queues bytes on its own.
        self.notify: Callable[[], object] = lambda: None
        self._awaiting: int | None = None
        self._last_sent = ACK
        self._defaults()

    def reset(self) -> None:
        """Power-on: defaults restored, nothing queued, reporting as the device powers up."""
        self.output.clear()
        self.reporting = self.REPORTING_AT_POWER_ON
        self._awaiting = None
        self._last_sent = ACK
        self._defaults()

    def _defaults(self) -> None:
        pass

    # Settings saved with the state, and their largest value (_FLAG: true or false).
    _SETTINGS: tuple[tuple[str, int], ...] = ()

    def save(self) -> dict[str, Any]:
        """Queued bytes, reporting, the command awaiting a parameter and the settings."""
        state: dict[str, Any] = {"output": list(self.output), "reporting": self.reporting,
                                 "awaiting": self._awaiting, "last_sent": self._last_sent}  # fmt: skip
        state.update({name: getattr(self, name) for name, _ in self._SETTINGS})
        return state

    def check(self, f: StateFields) -> Callable[[], None]:
        """Check a saved device; return what puts it into this one."""
        output = f.ints("output", 0, 0xFF, max_length=_QUEUE_LIMIT)
        reporting, last_sent = f.boolean("reporting"), f.integer("last_sent", 0, 0xFF)
        awaiting = f.optional_integer("awaiting", 0, 0xFF)
        if awaiting is not None and awaiting not in self.PARAMETER_COMMANDS:
            raise f.error("awaiting", f"is {awaiting:#04x}, not a command that takes a parameter")
        settings = {
            name: f.boolean(name) if high == _FLAG else f.integer(name, 0, high) for name, high in self._SETTINGS
        }

        def apply() -> None:
            self.output = deque(output)
            self.reporting, self._awaiting, self._last_sent = reporting, awaiting, last_sent
            for name, value in settings.items():
                setattr(self, name, value)

        return apply

    def _reply(self, *data: int) -> None:
        self.output.extend(data)
        self._last_sent = data[-1]

    def write(self, byte: int) -> None:
        """A byte from the host: a command, or the parameter of the previous one."""
        awaiting, self._awaiting = self._awaiting, None
        # A byte with bit 7 set is a new command even while a parameter is due.
        if awaiting is not None and not byte & 0x80:
            self._parameter(awaiting, byte)
            return
        if byte in self.PARAMETER_COMMANDS:
            self._awaiting = byte
            self._reply(ACK)
        elif byte == 0xFE:
            self.output.append(self._last_sent)
        else:
            self._command(byte)

    def _parameter(self, command: int, value: int) -> None:
        self._reply(ACK)

    def _command(self, command: int) -> None:
        self._reply(RESEND)


class Ps2Keyboard(_Ps2Device):
    """An MF2 keyboard (ID 0xAB 0x83) answering the PS/2 keyboard commands.

    Bytes for the guest (scan codes in the current set) are queued with
    :meth:`send`; they are dropped while scanning is disabled, as a real
    keyboard holds no keystrokes then.
    """

    PARAMETER_COMMANDS = frozenset({0xED, 0xF0, 0xF3})
    REPORTING_AT_POWER_ON = True
    _SETTINGS = (("leds", 0x07), ("scancode_set", 3), ("typematic", 0x7F))

    def _defaults(self) -> None:
        self.leds = 0
        self.scancode_set = 2
        self.typematic = 0x2B

    def send(self, data: bytes) -> None:
        """Queue bytes the keyboard transmits, if scanning is enabled."""
        if self.reporting:
            self.output.extend(data)
            self.notify()

    def _parameter(self, command: int, value: int) -> None:
        if command == 0xED:
            self.leds = value & 0x07
        elif command == 0xF3:
            self.typematic = value & 0x7F
        elif value == 0:
            self._reply(ACK, self.scancode_set)
            return
        elif value <= 3:
            self.scancode_set = value
        else:
            self._reply(RESEND)
            return
        self._reply(ACK)

    def _command(self, command: int) -> None:
        if command == 0xEE:
            self._reply(0xEE)
        elif command == 0xF2:
            self._reply(ACK, 0xAB, 0x83)
        elif command in (0xF4, 0xF5, 0xF6):
            # F4 enables scanning; F5 restores defaults and disables it; F6 restores defaults and enables it.
            self.output.clear()
            if command != 0xF4:
                self._defaults()
            self.reporting = command != 0xF5
            self._reply(ACK)
        elif command == 0xFF:
            self.output.clear()
            self._defaults()
            self.reporting = True
            self._reply(ACK, BAT_OK)
        else:
            self._reply(RESEND)


class Ps2Mouse(_Ps2Device):
    """A standard PS/2 mouse (ID 0x00) in stream mode; :meth:`move` queues movement packets."""

    PARAMETER_COMMANDS = frozenset({0xE8, 0xF3})
    _SETTINGS = (("sample_rate", 0xFF), ("resolution", 3), ("scaling_2to1", _FLAG), ("remote", _FLAG), ("buttons", 7))

    def _defaults(self) -> None:
        self.sample_rate = 100
        self.resolution = 2
        self.scaling_2to1 = False
        self.remote = False
        self.buttons = 0

    def move(self, dx: int, dy: int, buttons: int = 0) -> None:
        """Queue one movement packet (dx, dy in -256..255), if data reporting is on."""
        self.buttons = buttons & 0x07
        if self.reporting and not self.remote:
            self.output.extend(self._packet(dx, dy))
            self.notify()

    def _packet(self, dx: int, dy: int) -> tuple[int, int, int]:
        dx, dy = max(-256, min(255, dx)), max(-256, min(255, dy))
        flags = 0x08 | self.buttons | (0x10 if dx < 0 else 0) | (0x20 if dy < 0 else 0)
        return flags, dx & 0xFF, dy & 0xFF

    def _parameter(self, command: int, value: int) -> None:
        if command == 0xE8:
            self.resolution = value & 0x03
        else:
            self.sample_rate = value
        self._reply(ACK)

    def _command(self, command: int) -> None:
        if command in (0xE6, 0xE7):
            self.scaling_2to1 = command == 0xE7
            self._reply(ACK)
        elif command == 0xE9:
            # Packets order the buttons left, right, middle from bit 0; the status byte right, middle, left.
            b = self.buttons
            status = (0x40 if self.remote else 0) | (0x20 if self.reporting else 0)
            status |= (0x10 if self.scaling_2to1 else 0) | (b & 1) << 2 | (b & 4) >> 1 | (b & 2) >> 1
            self._reply(ACK, status, self.resolution, self.sample_rate)
        elif command in (0xEA, 0xF0):
            self.remote = command == 0xF0
            self._reply(ACK)
        elif command == 0xEB:
            self._reply(ACK, *self._packet(0, 0))
        elif command == 0xF2:
            self._reply(ACK, 0x00)
        elif command in (0xF4, 0xF5, 0xF6):
            self.output.clear()
            if command == 0xF6:
                self._defaults()
            self.reporting = command == 0xF4
            self._reply(ACK)
        elif command == 0xFF:
            self.output.clear()
            self._defaults()
            self.reporting = False
            self._reply(ACK, BAT_OK, 0x00)
        else:
            self._reply(RESEND)


class I8042:
    """The controller: command byte, output buffer, output port (A20, reset) and its two IRQ lines.

    ``on_reset`` is called when the guest pulses the CPU reset line (0xFE, or
    0xD1 with bit 0 clear); ``on_a20`` with the new state when A20 changes.
    :attr:`a20` holds the current state for a machine to read.
    """

    state_kind = "i8042"
    state_version = 1
    oldest_state_version = 1

    def __init__(
        self,
        *,
        io_base: int = 0x60,
        irq: IrqLine | None = None,
        aux_irq: IrqLine | None = None,
        keyboard: Ps2Keyboard | None = None,
        mouse: Ps2Mouse | None = None,
        on_reset: Callable[[], object] | None = None,
        on_a20: Callable[[bool], object] | None = None,
    ) -> None:
        self.io_base = io_base
        self.irq = irq if irq is not None else IrqLine(line=1)
        self.aux_irq = aux_irq if aux_irq is not None else IrqLine(line=12)
        self.keyboard = keyboard if keyboard is not None else Ps2Keyboard()
        self.mouse = mouse if mouse is not None else Ps2Mouse()
        self.on_reset = on_reset
        self.on_a20 = on_a20
        self.resets = 0
        self.keyboard.notify = self.mouse.notify = self._update
        self.reset()

    def reset(self) -> None:
        """Power-on state (QEMU's): both interrupts enabled, A20 on, nothing buffered; keyboard and mouse too."""
        self.keyboard.reset()
        self.mouse.reset()
        self.ram = bytearray(32)
        self.ram[0] = KBD_INT | AUX_INT
        self.output_port = 0xC0 | 0x0C | OUT_A20 | OUT_RESET
        self.last_write_was_command = True
        self._replies: deque[tuple[int, bool]] = deque()
        self._buffer: tuple[int, bool] | None = None
        self._last_read = 0
        self._pending: int | None = None
        self._update()

    def save(self) -> dict[str, Any]:
        """The controller, the keyboard and the mouse (see the module's docstring)."""
        return {
            "ram": self.ram.hex(),
            "output_port": self.output_port,
            "last_write_was_command": self.last_write_was_command,
            "replies": [[value, aux] for value, aux in self._replies],
            "buffer": None if self._buffer is None else list(self._buffer),
            "last_read": self._last_read,
            "pending": self._pending,
            "keyboard": self.keyboard.save(),
            "mouse": self.mouse.save(),
        }

    def restore(self, state: Mapping[str, Any], version: int) -> None:
        """Take a state :meth:`save` returned; check every field first."""
        f = StateFields(f"{self.state_kind}@{self.io_base:#x}", state)
        ram = f.data("ram", length=32)
        output_port = f.integer("output_port", 0, 0xFF)
        last_write_was_command = f.boolean("last_write_was_command")
        replies = [self._byte_and_source(f, f"replies[{i}]", item) for i, item in enumerate(self._list(f, "replies"))]
        raw_buffer = f.value("buffer")
        buffer = None if raw_buffer is None else self._byte_and_source(f, "buffer", raw_buffer)
        last_read = f.integer("last_read", 0, 0xFF)
        pending = f.optional_integer("pending", 0, 0xFF)
        if pending is not None and pending not in _TAKES_DATA:
            raise f.error("pending", f"is {pending:#04x}, not a command that takes a data byte")
        keyboard, mouse = self.keyboard.check(f.section("keyboard")), self.mouse.check(f.section("mouse"))
        self.ram, self.output_port, self.last_write_was_command = ram, output_port, last_write_was_command
        self._replies, self._buffer = deque(replies), buffer
        self._last_read, self._pending = last_read, pending
        keyboard()
        mouse()
        self._drive()

    @staticmethod
    def _list(f: StateFields, name: str) -> list[object]:
        value = f.value(name)
        if not isinstance(value, list) or len(value) > _QUEUE_LIMIT:
            raise f.error(name, f"is not a list of at most {_QUEUE_LIMIT} entries")
        return value

    @staticmethod
    def _byte_and_source(f: StateFields, name: str, item: object) -> tuple[int, bool]:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], int)
            or isinstance(item[0], bool)
            or not 0 <= item[0] <= 0xFF
            or not isinstance(item[1], bool)
        ):
            raise f.error(name, f"is {item!r}, not [a byte, true if from the mouse]")
        return item[0], item[1]

    @property
    def command_byte(self) -> int:
        return self.ram[0]

    @property
    def a20(self) -> bool:
        """True while the output port enables A20."""
        return bool(self.output_port & OUT_A20)

    @property
    def status(self) -> int:
        status = UNLOCKED | (self.ram[0] & SYS)
        if self.last_write_was_command:
            status |= CMD
        if self._buffer is not None:
            status |= OBF | (AUX_OBF if self._buffer[1] else 0)
        return status

    @on_port(0, max_size=1)
    def data(self, access: PortAccess) -> int | None:
        """Port 0x60: read the output buffer, or write a byte for the keyboard or the pending command."""
        if not access.is_write:
            if self._buffer is not None:
                self._last_read = self._buffer[0]
                self._buffer = None
                # The read deasserts the line before the next byte can assert it: one edge per byte.
                self.irq.lower()
                self.aux_irq.lower()
                self._update()
            return self._last_read
        self.last_write_was_command = False
        command, self._pending = self._pending, None
        value = access.value
        if command is None:
            # Sending to the keyboard re-enables its port (as QEMU does).
            self.ram[0] &= ~KBD_DISABLED
            self.keyboard.write(value)
        elif command < 0x80:
            self.ram[command & 0x1F] = value
        elif command == 0xD1:
            self._write_output_port(value)
        elif command in (0xD2, 0xD3):
            self._replies.append((value, command == 0xD3))
        else:
            self.mouse.write(value)
        self._update()
        return None

    @on_port(4, max_size=1)
    def command(self, access: PortAccess) -> int | None:
        """Port 0x64: read the status register, or write a controller command."""
        if not access.is_write:
            return self.status
        self.last_write_was_command = True
        self._pending = None
        self._execute(access.value)
        self._update()
        return None

    def _execute(self, command: int) -> None:
        ram = self.ram
        if command in _TAKES_DATA:
            self._pending = command
        elif 0x20 <= command < 0x40:
            self._reply(ram[command & 0x1F])
        elif command == 0xA4:
            self._reply(0xF1)
        elif command in (0xA7, 0xA8):
            ram[0] = ram[0] | AUX_DISABLED if command == 0xA7 else ram[0] & ~AUX_DISABLED
        elif command in (0xA9, 0xAB):
            self._reply(0x00)
        elif command == 0xAA:
            ram[0] |= SYS
            self._reply(0x55)
        elif command in (0xAD, 0xAE):
            ram[0] = ram[0] | KBD_DISABLED if command == 0xAD else ram[0] & ~KBD_DISABLED
        elif command == 0xC0:
            self._reply(0x80)
        elif command == 0xD0:
            self._reply(self._output_port_value())
        elif command in (0xDD, 0xDF):
            self._write_output_port(self.output_port & ~OUT_A20 | (OUT_A20 if command == 0xDF else 0))
        elif command == 0xE0:
            self._reply(0x00)
        elif command >= 0xF0 and not command & OUT_RESET:
            # The pulse commands hold the selected bits low for 6 us; only bit 0 (reset) does anything.
            self._request_reset()

    def _reply(self, value: int) -> None:
        self._replies.append((value, False))

    def _output_port_value(self) -> int:
        value = self.output_port & ~(OUT_KBD_OBF | OUT_AUX_OBF)
        return value | (OUT_KBD_OBF if self.irq.level else 0) | (OUT_AUX_OBF if self.aux_irq.level else 0)

    def _write_output_port(self, value: int) -> None:
        old, self.output_port = self.output_port, value
        if (old ^ value) & OUT_A20 and self.on_a20 is not None:
            self.on_a20(self.a20)
        if not value & OUT_RESET:
            self._request_reset()

    def _request_reset(self) -> None:
        self.resets += 1
        if self.on_reset is not None:
            self.on_reset()

    def _update(self) -> None:
        # Refill the output buffer if it is empty, then drive both lines from what it holds.
        if self._buffer is None:
            command_byte = self.ram[0]
            if self._replies:
                self._buffer = self._replies.popleft()
            elif self.keyboard.output and not command_byte & KBD_DISABLED:
                self._buffer = (self.keyboard.output.popleft(), False)
            elif self.mouse.output and not command_byte & AUX_DISABLED:
                self._buffer = (self.mouse.output.popleft(), True)
        self._drive()

    def _drive(self) -> None:
        buffer = self._buffer
        self.irq.set(buffer is not None and not buffer[1] and bool(self.ram[0] & KBD_INT))
        self.aux_irq.set(buffer is not None and buffer[1] and bool(self.ram[0] & AUX_INT))
