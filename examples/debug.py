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
"""

from __future__ import annotations

from collections.abc import Callable

from dispatcher import PortAccess, on_port

__all__ = ["DebugConsole", "DebugExit", "PostCodes"]

PROBE_VALUE = 0xE9


class DebugConsole:
    """A write-only character console on one port; reads answer 0xE9."""

    def __init__(self, sink: Callable[[bytes], object] = lambda data: None, *, io_base: int = 0x402) -> None:
        self.io_base = io_base
        self.sink = sink

    @on_port(0, max_size=1)
    def port(self, access: PortAccess) -> int | None:
        """The console byte; the device is 8 bits wide, wider accesses arrive as bytes."""
        if access.is_write:
            self.sink(bytes((access.value,)))
            return None
        return PROBE_VALUE


class PostCodes:
    """Port 0x80: POST codes as firmware writes them, oldest first."""

    def __init__(self, *, io_base: int = 0x80, on_code: Callable[[int], object] | None = None) -> None:
        self.io_base = io_base
        self.codes: list[int] = []
        self.on_code = on_code

    @property
    def last(self) -> int | None:
        return self.codes[-1] if self.codes else None

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
        self.port = on_port(0, size)(port)

    def _access(self, access: PortAccess) -> int | None:
        if access.is_write:
            self.value = access.value
            self.status = (access.value << 1) | 1
            if self.on_exit is not None:
                self.on_exit(self.status)
            return None
        return 0
