"""Devices with planted bugs, for the minimize tests (loaded by spec: ``buggy_devices:...``)."""

from __future__ import annotations

from dispatcher import PortAccess, Router


class Sequenced:
    """0x510-0x513: reading 0x512 raises once 0x5A was written to 0x510 and then 0xA5 to 0x511.

    0x513 is a scratch register. ``fixed`` removes the bug.
    """

    def __init__(self, fixed: bool = False) -> None:
        self.fixed = fixed
        self.armed = False
        self.loaded = False
        self.scratch = 0

    def io(self, access: PortAccess) -> int | None:
        offset = access.offset
        if access.is_write:
            if offset == 0 and access.value == 0x5A:
                self.armed = True
            elif offset == 1 and access.value == 0xA5 and self.armed:
                self.loaded = True
            elif offset == 3:
                self.scratch = access.value
            return None
        if offset == 2:
            if self.loaded and not self.fixed:
                raise ZeroDivisionError("the planted bug")
            return 0x12
        return self.scratch if offset == 3 else offset


class Looping:
    """0x520-0x521: reading 0x520 never returns once 0x77 was written to 0x521 (unless ``fixed``)."""

    def __init__(self, fixed: bool = False) -> None:
        self.fixed = fixed
        self.stuck = False

    def io(self, access: PortAccess) -> int | None:
        if access.is_write:
            if access.offset == 1 and access.value == 0x77:
                self.stuck = True
            return None
        while self.stuck and not self.fixed:
            pass
        return 0x20 + access.offset


def sequenced(fixed: bool = False) -> Router:
    router = Router()
    device = Sequenced(fixed)
    router.claim(0x510, 4)(device.io)
    return router


def looping(fixed: bool = False) -> Router:
    router = Router()
    device = Looping(fixed)
    router.claim(0x520, 2)(device.io)
    return router
