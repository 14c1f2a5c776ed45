"""Devices the service tests load with ``--device service_devices:router``."""

from __future__ import annotations

import anyio

from dispatcher import PortAccess, Router

SCRATCH, SLOW, BROKEN, MOST_AT_ONCE, GATE = 0x3FF, 0x80, 0x81, 0x82, 0x83
SLOW_SECONDS = 0.3


def router() -> Router:
    """A scratch register, a slow async register, one whose handler always fails, a read-only
    register that counts the most slow accesses that were ever in progress at once, and a gate:
    a read of it waits until some VP writes it."""
    devices = Router()
    scratch = [0]
    slow_now = [0, 0]  # in progress, most ever

    @devices.claim(SCRATCH)
    def scratch_register(access: PortAccess) -> int | None:
        if access.is_write:
            scratch[0] = access.value
            return None
        return scratch[0]

    @devices.claim(SLOW)
    async def slow_register(access: PortAccess) -> int | None:
        slow_now[0] += 1
        slow_now[1] = max(slow_now)
        try:
            await anyio.sleep(SLOW_SECONDS)
        finally:
            slow_now[0] -= 1
        return None if access.is_write else 0x40 + access.vp_index % 64

    @devices.claim(MOST_AT_ONCE, access="r")
    def most_at_once(access: PortAccess) -> int:
        return slow_now[1]

    @devices.claim(BROKEN)
    def broken_register(access: PortAccess) -> int | None:
        raise RuntimeError("this device is broken on purpose")

    closed_gate: list[anyio.Event] = []

    @devices.claim(GATE)
    async def gate(access: PortAccess) -> int | None:
        if access.is_write:
            for waiting in closed_gate:
                waiting.set()
            closed_gate.clear()
            return None
        opened = anyio.Event()
        closed_gate.append(opened)
        await opened.wait()
        return 0x6A

    return devices
