"""The PC's devices as a ``serve`` device set, for ``python -m examples.pc --backend unix:PATH``.

::

    PC_DISK=disk.img python -m examples serve --socket /tmp/pc.sock --device examples.pc_remote_devices:pc_devices
    python -m examples.pc --bios /usr/share/seabios/bios.bin --backend unix:/tmp/pc.sock

Every port the guest touches is answered here. What a PC board has besides
ports, the VMM reaches through :class:`PlatformPorts`, a block of four
dword registers at 0x0EF0-0x0EFF (a port range firmware leaves alone): the
interrupt controller's INTR output and acknowledge cycle, the timers' next
due time, the exit device, and the serial and debug console output, which
the VMM prints. The VMM reads them with intercepts of its own, from a VP
index no vCPU has (:data:`PLATFORM_VP`); the intercept protocol has no other
way to carry an interrupt, so this is the narrow waist. Reading the block
also brings the timers (PIT, RTC, UART) up to date, as the in-process
machine loop does (:class:`examples.pc_kvm.TimeKeeper`).

Environment: ``PC_DISK`` (an image for ATA device 0, optional) and
``PC_MEMORY_MIB`` (default 64; it must match the VMM's ``--memory``, the
CMOS reports it).
"""

from __future__ import annotations

import os
import time
from collections import deque

from dispatcher import PortAccess, Router, on_port

from .pc_devices import PC, build_pc
from .pc_kvm import TimeKeeper

__all__ = [
    "ACK",
    "CONSOLE",
    "EXIT",
    "NEXT_DUE",
    "NONE",
    "PLATFORM_BASE",
    "PLATFORM_VP",
    "PlatformPorts",
    "pc_devices",
]

PLATFORM_BASE = 0x0EF0
PLATFORM_VP = 0xFFFF_FFF0  # the VP index of the VMM's own intercepts to the platform block
# Register offsets (dword reads; writes are ignored):
ACK = 0x0  # the acknowledge cycle: 0x100 | vector (0 if INTR was low), | 0x200 if INTR is high after it
NEXT_DUE = 0x4  # bit 31: INTR is high; bits 0-30: microseconds until the timers next need a look (capped)
EXIT = 0x8  # 0x100 | the byte written to the exit device, 0x200 for a reset request, else 0
CONSOLE = 0xC  # bits 24-25: how many output bytes follow (0-3), bits 0-23: the bytes, oldest lowest
NONE = 0
_MAX_WAIT_US = 0x7FFF_FFFF
_CONSOLE_LIMIT = 1 << 20


class PlatformPorts:
    """The VMM's view of the PC's board: INTR, INTA, timers, exit device, console output."""

    io_base = PLATFORM_BASE

    def __init__(self, pc: PC, output: deque[int]) -> None:
        self.pc = pc
        self.time = TimeKeeper(pc)
        self.output = output
        self.exit_value: int | None = None
        self.reset_requested = False

    @on_port(0, 16, max_size=4)
    def registers(self, access: PortAccess) -> int | None:
        if access.is_write or access.size != 4:
            return None if access.is_write else 0xFFFF_FFFF
        offset = access.offset
        pc = self.pc
        if offset == ACK:
            self.time.poll()
            vector = 0x100 | pc.pic.acknowledge() if pc.pic.pending_vector() is not None else NONE
            return vector | (0x200 if pc.pic.output else 0)
        if offset == NEXT_DUE:
            self.time.poll()
            due = self.time.next_due()
            wait = _MAX_WAIT_US if due is None else max(0, min(_MAX_WAIT_US, int((due - time.monotonic()) * 1e6)))
            return wait | (0x8000_0000 if pc.pic.output else 0)
        if offset == EXIT:
            if self.exit_value is not None:
                return 0x100 | self.exit_value
            return 0x200 if self.reset_requested else NONE
        count = min(3, len(self.output))
        value = count << 24
        for i in range(count):
            value |= self.output.popleft() << 8 * i
        return value


def pc_devices() -> Router:
    """The PC (:func:`examples.pc_devices.build_pc`) and its platform block, as ``PC_DISK``/``PC_MEMORY_MIB`` say."""
    output: deque[int] = deque(maxlen=_CONSOLE_LIMIT)
    disk = os.environ.get("PC_DISK") or None
    memory = int(os.environ.get("PC_MEMORY_MIB", "64")) << 20
    box: list[PlatformPorts] = []

    def exited(status: int) -> None:
        box[0].exit_value = status >> 1

    def reset() -> None:
        box[0].reset_requested = True

    pc = build_pc(memory_size=memory, disk=disk, serial_sink=output.extend, debug_sink=output.extend,
                  on_exit=exited, on_reset=reset)  # fmt: skip
    platform = PlatformPorts(pc, output)
    box.append(platform)
    router = Router()
    router.include(pc.router)
    router.include(platform)
    return router
