"""Devices the command-line tests serve with ``--device cli_devices:router`` (the service runs in this folder)."""

from __future__ import annotations

import anyio

from dispatcher import PortAccess, Router, on_port

LATCH, READ_ONLY, BROKEN, GATE = 0x510, 0x530, 0x520, 0x540
READ_ONLY_VALUE = 0x6B


class Latch:
    """A 16-bit register at two ports (0x510 and 0x511), each byte at its own port."""

    io_base = LATCH

    def __init__(self) -> None:
        self.data = bytearray(2)

    @on_port(0, 2)
    def io(self, access: PortAccess) -> int | None:
        span = slice(access.offset, access.offset + access.size)
        if access.is_write:
            self.data[span] = access.value.to_bytes(access.size, "little")
            return None
        return int.from_bytes(self.data[span], "little")


def router() -> Router:
    """The latch at 0x510-0x511, a read-only register, a register whose handler always fails, and a gate:
    a read of the gate waits until some VP writes it."""
    devices = Router()
    devices.include(Latch())

    @devices.claim(READ_ONLY, access="r")
    def read_only(access: PortAccess) -> int:
        return READ_ONLY_VALUE

    @devices.claim(BROKEN)
    def broken(access: PortAccess) -> int | None:
        raise RuntimeError("this device is broken on purpose")

    waiting: list[anyio.Event] = []

    @devices.claim(GATE)
    async def gate(access: PortAccess) -> int | None:
        if access.is_write:
            for event in waiting:
                event.set()
            waiting.clear()
            return None
        opened = anyio.Event()
        waiting.append(opened)
        await opened.wait()
        return 0x6A

    return devices
