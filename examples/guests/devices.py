"""The small devices the test guests talk to besides a UART and the exit device.

:class:`EchoLatch` is QEMU's ``pc-testdev`` register at 0xE0-0xE3: four
bytes of storage where an N-byte access at port P reads or writes bytes
P-0xE0 .. P-0xE0+N-1. The self-checking guests (``io_prot32``,
``io_long64``) store and load it with every width and form of IN/OUT and
INS/OUTS; when done, it holds the number of checks they ran.
"""

from __future__ import annotations

from dispatcher import PortAccess, on_port

__all__ = ["EchoLatch"]


class EchoLatch:
    """A 32-bit register behind four ports; ``accesses`` logs (is_write, port, size, value)."""

    def __init__(self, *, io_base: int = 0xE0) -> None:
        self.io_base = io_base
        self.value = 0
        self.accesses: list[tuple[bool, int, int, int]] = []

    @on_port(0, 4)
    def register(self, access: PortAccess) -> int | None:
        shift = 8 * access.offset
        mask = ((1 << 8 * access.size) - 1) << shift
        if access.is_write:
            self.value = (self.value & ~mask | access.value << shift & mask) & 0xFFFF_FFFF
            self.accesses.append((True, access.port, access.size, access.value))
            return None
        result = (self.value & mask) >> shift
        self.accesses.append((False, access.port, access.size, result))
        return result
