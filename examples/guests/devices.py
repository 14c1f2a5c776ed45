"""The small devices the test guests talk to besides a UART and the exit device.

:class:`EchoLatch` is QEMU's ``pc-testdev`` register at 0xE0-0xE3: four
bytes of storage where an N-byte access at port P reads or writes bytes
P-0xE0 .. P-0xE0+N-1. The self-checking guests (``io_prot32``,
``io_long64``) store and load it with every width and form of IN/OUT and
INS/OUTS; when done, it holds the number of checks they ran.

:class:`TicketDispenser` is what ``smp_tickets`` runs on every vCPU at
once: a device whose state is wrong if two of its handlers ever run at the
same time.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from dispatcher import PortAccess, on_port

__all__ = ["EchoLatch", "TicketDispenser"]


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


class TicketDispenser:
    """Numbered tickets for every vCPU (``smp_tickets``); it notices handlers that run at the same time.

    At ``io_base`` (0x520) a 32-bit read takes the next ticket (numbered
    from 1); at ``io_base + 4`` a 32-bit write gives one back; at
    ``io_base + 8`` a byte write reports the vCPU's status. Taking a ticket
    reads the counter, calls ``window`` and then stores the counter plus
    one: a second handler running meanwhile would hand out the same number.
    ``window`` by default gives up the GIL (``time.sleep(0)``), so another
    thread may run there. The device counts such overlaps, and records
    every inconsistency it sees in ``errors``: a ticket handed out twice,
    given back by another VP than the one that took it, or twice.
    """

    def __init__(self, *, io_base: int = 0x520, window: Callable[[], object] = lambda: time.sleep(0)) -> None:
        self.io_base = io_base
        self.window = window
        self.next_ticket = 1
        self.holders: dict[int, int] = {}  # ticket -> the VP holding it
        self.taken: Counter[int] = Counter()  # per VP
        self.returned: Counter[int] = Counter()  # per VP
        self.status: dict[int, int] = {}  # per VP, as reported at io_base + 8
        self.overlaps = 0
        self.errors: list[str] = []
        self._busy = False

    def _enter(self) -> None:
        if self._busy:
            self.overlaps += 1
        self._busy = True

    @on_port(0, 4)
    def take(self, access: PortAccess) -> int | None:
        """Read: the next ticket, now held by the reading VP."""
        vp = access.vp_index
        if access.is_write or access.size != 4:
            self.errors.append(f"VP {vp}: {access.size}-byte {'write' if access.is_write else 'read'} at take")
            return None
        self._enter()
        try:
            ticket = self.next_ticket
            self.window()
            if ticket in self.holders:
                self.errors.append(f"ticket {ticket} handed out twice (VP {self.holders[ticket]}, VP {vp})")
            self.holders[ticket] = vp
            self.taken[vp] += 1
            self.next_ticket = ticket + 1
        finally:
            self._busy = False
        return ticket

    @on_port(4, 4)
    def give_back(self, access: PortAccess) -> None:
        """Write: the VP returns a ticket it holds."""
        self._enter()
        try:
            holder = self.holders.pop(access.value, None)
            self.window()
            if holder != access.vp_index:
                self.errors.append(f"VP {access.vp_index} gave back ticket {access.value}, held by {holder}")
            self.returned[access.vp_index] += 1
        finally:
            self._busy = False

    @on_port(8, 1)
    def report(self, access: PortAccess) -> None:
        """Write: the VP's status when it is done (0: its tickets only grew)."""
        if access.is_write:
            self.status[access.vp_index] = access.value
