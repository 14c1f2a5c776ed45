"""Devices for the recording tests' services: a scratch register at 0x510, a port whose handler never returns."""

from __future__ import annotations

import threading

from dispatcher import PortAccess, Router

SCRATCH = 0x510
HANG = 0x511


def router() -> Router:
    made = Router()
    value = bytearray(1)
    never = threading.Event()

    @made.claim(SCRATCH)
    def scratch(access: PortAccess) -> int | None:
        if access.is_write:
            value[0] = access.value
            return None
        return value[0]

    @made.claim(HANG)
    def hang(access: PortAccess) -> int | None:
        never.wait()  # a handler stuck for good: the service's watchdog gives up on it at the deadline
        return None

    return made
