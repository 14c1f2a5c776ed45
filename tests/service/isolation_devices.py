"""Devices the isolation tests load: a scratch register, a handler that never returns, a shared counter."""

from __future__ import annotations

import time

from dispatcher import PortAccess, Router
from transports.service import shared

SCRATCH, HANG, COUNTER = 0x3FF, 0x84, 0x85


def router() -> Router:
    """A scratch register (each VM its own) and a port whose synchronous handler never returns."""
    devices = Router()
    scratch = [0]

    @devices.claim(SCRATCH)
    def scratch_register(access: PortAccess) -> int | None:
        if access.is_write:
            scratch[0] = access.value
            return None
        return scratch[0]

    @devices.claim(HANG, access="r")
    def hang(access: PortAccess) -> int:
        time.sleep(3600)  # a device model stuck for good: only its process ending stops it
        return 0

    return devices


@shared
def counter() -> Router:
    """One counter for every VM: each read returns how many reads there were before, from any VM."""
    devices = Router()
    reads = [0]

    @devices.claim(COUNTER, access="r")
    def count(access: PortAccess) -> int:
        reads[0] += 1
        return reads[0] - 1

    return devices
