"""Debug ports that firmware and test guests use: a console, POST codes, an exit device.

- :class:`DebugConsole`: QEMU's ``isa-debugcon``. Each byte written goes to a
  sink; a read returns 0xE9, which is how firmware (SeaBIOS, OVMF) probes
  that the console exists. SeaBIOS writes to 0x402 under QEMU, Bochs and
  others use 0xE9.
- :class:`PostCodes`: the POST diagnostic port 0x80. Every code written is
  recorded; a read returns the last code, as the DMA page register that
  occupies the port on PIIX-era chipsets does.
- :class:`DebugExit`: QEMU's ``isa-debug-exit``. A write of ``value`` ends
  the run with status ``(value << 1) | 1``, the exit code QEMU gives, so a
  test guest can never produce status 0 by accident. Default 0x501 with two
  ports; the common alternative is ``io_base=0xF4, size=4``.

Device state (kinds ``debugcon``, ``post-codes`` and ``debug-exit``, version
1): the console has none (an empty state, so that a VM's document lists
it); the POST port keeps the codes written; the exit device the value
written, if any.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dispatcher import PortAccess, StateFields, on_port, owned_by

__all__ = ["DebugConsole", "DebugExit", "PostCodes"]

PROBE_VALUE = 0xE9
_CODES_LIMIT = 1 << 20


class DebugConsole:
    """A write-only character console on one port; reads answer 0xE9."""

    state_kind = "debugcon"
    state_version = 1
    oldest_state_version = 1

    def __init__(self, sink: Callable[[bytes], object] = lambda data: None, *, io_base: int = 0x402) -> None:
        self.io_base = io_base
        self.sink = sink

    def reset(self) -> None:
        """Nothing to reset: the console holds no state."""

    def save(self) -> dict[str, Any]:
        """An empty state."""
        return {}

    def restore(self, state: Mapping[str, Any], version: int) -> None:
        """Check that the state is an object; there is nothing to take."""
        StateFields(f"{self.state_kind}@{self.io_base:#x}", state)

    @on_port(0, max_size=1)
    def port(self, access: PortAccess) -> int | None:
        """The console byte; the device is 8 bits wide, wider accesses arrive as bytes."""
        if access.is_write:
            self.sink(bytes((access.value,)))
            return None
        return PROBE_VALUE


class PostCodes:
    """Port 0x80: POST codes as firmware writes them, oldest first."""

    state_kind = "post-codes"
    state_version = 1
    oldest_state_version = 1

    def __init__(self, *, io_base: int = 0x80, on_code: Callable[[int], object] | None = None) -> None:
        self.io_base = io_base
        self.codes: list[int] = []
        self.on_code = on_code

    @property
    def last(self) -> int | None:
        return self.codes[-1] if self.codes else None

    def reset(self) -> None:
        """Power-on: no code written yet, so reads answer 0."""
        self.codes = []

    def save(self) -> dict[str, Any]:
        """The codes written, oldest first."""
        return {"codes": list(self.codes)}

    def restore(self, state: Mapping[str, Any], version: int) -> None:
        """Take a state :meth:`save` returned."""
        f = StateFields(f"{self.state_kind}@{self.io_base:#x}", state)
        self.codes = f.ints("codes", 0, 0xFF, max_length=_CODES_LIMIT)

    @on_port(0, max_size=1)
    def port(self, access: PortAccess) -> int | None:
        if access.is_write:
            self.codes.append(access.value)
            if self.on_code is not None:
                self.on_code(access.value)
            return None
        return self.codes[-1] if self.codes else 0


class DebugExit:
    """A port whose write asks the machine to stop with a status.

    ``status`` is None until the guest writes; then it holds
    ``(value << 1) | 1`` and ``on_exit(status)`` is called, so a machine loop
    can stop the dispatcher. A write of any width is one exit request carrying
    the whole value; reads return 0, as QEMU's device does.
    """

    state_kind = "debug-exit"
    state_version = 1
    oldest_state_version = 1

    def __init__(self, *, io_base: int = 0x501, size: int = 2, on_exit: Callable[[int], object] | None = None) -> None:
        if size not in (1, 2, 4):
            raise ValueError(f"size must be 1, 2 or 4 ports, not {size}")
        self.io_base = io_base
        self.size = size
        self.on_exit = on_exit
        self.status: int | None = None
        self.value: int | None = None

        # The port count is a constructor argument, so the handler is marked per instance.
        def port(access: PortAccess) -> int | None:
            return self._access(access)

        port.__qualname__ = f"{type(self).__qualname__}.port"
        self.port = on_port(0, size)(owned_by(self)(port))

    def reset(self) -> None:
        """Power-on: no exit requested."""
        self.status = self.value = None

    def save(self) -> dict[str, Any]:
        """The value written, or null."""
        return {"value": self.value}

    def restore(self, state: Mapping[str, Any], version: int) -> None:
        """Take a state :meth:`save` returned (``on_exit`` is not called again)."""
        f = StateFields(f"{self.state_kind}@{self.io_base:#x}", state)
        value = f.optional_integer("value", 0, (1 << 8 * self.size) - 1)
        self.value, self.status = value, None if value is None else (value << 1) | 1

    def _access(self, access: PortAccess) -> int | None:
        if access.is_write:
            self.value = access.value
            self.status = (access.value << 1) | 1
            if self.on_exit is not None:
                self.on_exit(self.status)
            return None
        return 0
