"""Devices the hostile-client tests serve with ``--device hostile_devices:vm_devices`` (one set per VM)."""

from __future__ import annotations

import os
import socket
import time
from collections import deque

import anyio

from dispatcher import PortAccess, Router

PER_VP, SCRATCH, SLOW, HANG, ESCAPE, FIFO, CMOS = 0x3F0, 0x3FF, 0x80, 0x81, 0x82, 0xE9, 0x70
OPEN_A_FILE, OPEN_A_SOCKET = 1, 2
SLOW_SECONDS = 0.2
HANG_SECONDS = 30.0  # far past any deadline the tests give; the watchdog must not wait for it
FIFO_LIMIT = 1 << 16


class Cmos:
    """An index/data register pair, as the RTC's CMOS: what it holds shows in ``inspect`` (``last``)."""

    def __init__(self) -> None:
        self.index = 0
        self.last = 0
        self.cells = bytearray(128)

    def access(self, access: PortAccess) -> int | None:
        if access.offset == 0:
            if access.is_write:
                self.index = access.value & 0x7F
                return None
            return self.index
        if access.is_write:
            self.cells[self.index] = self.last = access.value
            return None
        return self.cells[self.index]


def vm_devices() -> Router:
    """A fresh device set for one VM.

    ``PER_VP`` (4 ports, read and written 4 bytes at a time) keeps one value per VP: a read returns what
    that VP last wrote, so a completion's value proves which intercept it
    answers. ``SCRATCH`` is one register for the whole VM; ``SLOW`` is an
    async register that takes ``SLOW_SECONDS``; ``HANG`` is a synchronous
    handler that blocks ``HANG_SECONDS``; ``FIFO`` is a byte FIFO for string
    I/O (OUTS pushes, INS pops, 0xFF when empty). A write to ``ESCAPE`` does
    what a sandboxed worker must not be able to: open a file
    (``OPEN_A_FILE``) or a network socket (``OPEN_A_SOCKET``). ``CMOS`` and
    ``CMOS + 1`` are a :class:`Cmos`.
    """
    devices = Router()
    per_vp: dict[int, int] = {}
    scratch = [0]
    fifo: deque[int] = deque(maxlen=FIFO_LIMIT)

    @devices.claim(PER_VP, 4)
    def per_vp_register(access: PortAccess) -> int | None:
        if access.is_write:
            per_vp[access.vp_index] = access.value
            return None
        return per_vp.get(access.vp_index, 0)

    @devices.claim(SCRATCH)
    def scratch_register(access: PortAccess) -> int | None:
        if access.is_write:
            scratch[0] = access.value
            return None
        return scratch[0]

    @devices.claim(SLOW)
    async def slow_register(access: PortAccess) -> int | None:
        await anyio.sleep(SLOW_SECONDS)
        return None if access.is_write else 0x40 + access.vp_index % 64

    @devices.claim(HANG)
    def hanging_register(access: PortAccess) -> int | None:
        time.sleep(HANG_SECONDS)
        return None if access.is_write else 0x5A

    @devices.claim(ESCAPE, access="w")
    def escape(access: PortAccess) -> None:
        if access.value == OPEN_A_FILE:
            os.close(os.open("/etc/hostname", os.O_RDONLY))
        elif access.value == OPEN_A_SOCKET:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()

    @devices.claim(FIFO, max_size=1)
    def fifo_register(access: PortAccess) -> int | None:
        if access.is_write:
            fifo.append(access.value)
            return None
        return fifo.popleft() if fifo else 0xFF

    devices.add(Cmos().access, CMOS, 2, max_size=1)
    return devices
