"""In-memory transport on anyio memory object streams, for tests and in-process VMMs."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from dispatcher import Transport, TransportClosedError

__all__ = ["MemoryTransport", "memory_transport_pair"]


class MemoryTransport(Transport):
    """One end of an in-memory connection; each stream item is a whole batch."""

    def __init__(
        self, send: MemoryObjectSendStream[list[bytes]], receive: MemoryObjectReceiveStream[list[bytes]]
    ) -> None:
        self._send = send
        self._receive = receive

    async def receive_batch(self) -> list[bytes]:
        try:
            batch = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return []
        while True:
            try:
                batch += self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return batch

    async def send_batch(self, frames: Sequence[bytes]) -> None:
        try:
            await self._send.send(list(frames))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as error:
            raise TransportClosedError("the other end of the memory transport is closed") from error

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def memory_transport_pair(max_batches: float = 64) -> tuple[MemoryTransport, MemoryTransport]:
    """Two connected ends: what one sends, the other receives.

    ``max_batches`` bounds each direction's buffer, so a fast sender waits
    for a slow receiver instead of queueing without limit.
    """
    a_send, b_receive = anyio.create_memory_object_stream[list[bytes]](max_batches)
    b_send, a_receive = anyio.create_memory_object_stream[list[bytes]](max_batches)
    return MemoryTransport(a_send, a_receive), MemoryTransport(b_send, b_receive)
