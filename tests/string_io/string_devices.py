"""Devices the string I/O service test loads with ``--device string_devices:router``."""

from __future__ import annotations

from collections import deque

from dispatcher import BulkAccess, PortAccess, Router

FIFO, BYTES = 0x1F0, 0xE9


def router() -> Router:
    """A little-endian byte FIFO at 0x1F0-0x1F1 with a bulk handler, and a byte FIFO at 0xE9 without one:
    OUTS pushes bytes, INS pops them (0xFF when empty)."""
    devices = Router()
    fifos: dict[int, deque[int]] = {FIFO: deque(), BYTES: deque()}

    def element(access: PortAccess) -> int | None:
        fifo = fifos[access.port - access.offset]
        if access.is_write:
            fifo.extend(access.value.to_bytes(access.size, "little"))
            return None
        return int.from_bytes(bytes(fifo.popleft() if fifo else 0xFF for _ in range(access.size)), "little")

    def chunk(access: BulkAccess) -> bytes | None:
        fifo = fifos[FIFO]
        if access.is_write:
            fifo.extend(access.data)
            return None
        return bytes(fifo.popleft() if fifo else 0xFF for _ in range(access.elements * access.size))

    devices.add(element, FIFO, 2)
    devices.add_bulk(chunk, FIFO)
    devices.add(element, BYTES)
    return devices
