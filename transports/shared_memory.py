"""Guest memory shared over a UNIX socket: memfd regions passed with SCM_RIGHTS.

The VMM sends one "memory region" frame per guest-physical range, with the
descriptor of the memory behind it (a memfd, or any file it can map)
attached, as vhost-user's memory table and vfio-user's DMA map do; the
service maps it and string I/O on that connection reads and writes the
guest's own memory. The layout is in docs/PROTOCOL.md ("Guest memory
regions").

VMM side::

    fd = os.memfd_create("ram")
    os.ftruncate(fd, size)
    await share_region(client.transport, 0, fd, size)

Service side, :func:`with_shared_memory` wraps each UNIX connection in a
:class:`SharedMemoryTransport`, whose declared ``guest`` the
:class:`~dispatcher.Dispatcher` uses for that connection. Region frames
never reach the engine. A region is applied when the frames before it have
been handed on, so intercepts see exactly the regions sent before them.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Sequence
from typing import NamedTuple

from dispatcher import (
    REGION,
    UNKNOWN_VP,
    BufferMemory,
    FieldValueError,
    FrameError,
    Guest,
    Registers,
    Status,
    Transport,
)
from dispatcher.wire import HEADER_SIZE, REGION_STRUCT, Offset, check_header, message_type, pack_completion

from .unix import UnixTransport

__all__ = [
    "MAX_REGIONS",
    "REGION",
    "REGION_VERSION",
    "RegionFrame",
    "SharedMemoryTransport",
    "carries_descriptor",
    "decode_region",
    "encode_region",
    "encode_unmap",
    "share_region",
    "unshare_region",
    "with_shared_memory",
]

log = logging.getLogger("intercept_dispatch.transports")

REGION_VERSION = 1
"""The version a region frame carries; a frame of another version is refused."""
MAX_REGIONS = 64
"""Regions one connection may map at once."""

READ_ONLY, UNMAP = 0x01, 0x02
_PAYLOAD = REGION_STRUCT.size - HEADER_SIZE
_KNOWN = frozenset({REGION})


class RegionFrame(NamedTuple):
    """One decoded memory region frame. With ``unmap``, only ``guest_physical`` counts."""

    guest_physical: int
    size: int
    fd_offset: int
    read_only: bool
    unmap: bool


def encode_region(guest_physical: int, size: int, *, fd_offset: int = 0, read_only: bool = False) -> bytes:
    """The frame that maps ``size`` bytes of the attached descriptor, from ``fd_offset``, at ``guest_physical``."""
    return REGION_STRUCT.pack(REGION, _PAYLOAD, 0, 0, 0, 0, REGION_VERSION, READ_ONLY if read_only else 0, 0, 0,
                        guest_physical, size, fd_offset)  # fmt: skip


def encode_unmap(guest_physical: int) -> bytes:
    """The frame that removes the region starting at ``guest_physical`` (no descriptor attached)."""
    return REGION_STRUCT.pack(REGION, _PAYLOAD, 0, 0, 0, 0, REGION_VERSION, UNMAP, 0, 0, guest_physical, 0, 0)


def carries_descriptor(frame: bytes) -> bool:
    """Whether a region frame comes with a descriptor: every one without the UNMAP flag does."""
    return len(frame) <= Offset.REGION_FLAGS or not frame[Offset.REGION_FLAGS] & UNMAP


def decode_region(frame: bytes) -> RegionFrame:
    """Parse a region frame; raise a ``FrameError`` naming the bad field and its offset."""
    check_header(frame, _KNOWN)
    *_, version, flags, _, _, guest_physical, size, fd_offset = REGION_STRUCT.unpack_from(frame)
    if version != REGION_VERSION:
        raise FieldValueError(
            f"region frames are version {REGION_VERSION}", field="version", offset=Offset.REGION_VERSION, value=version
        )
    if flags & ~(READ_ONLY | UNMAP):
        raise FieldValueError("unknown region flags", field="flags", offset=Offset.REGION_FLAGS, value=flags)
    if not flags & UNMAP:
        if size == 0 or guest_physical + size > 1 << 64:
            raise FieldValueError(
                "the region is empty or passes 2**64", field="size", offset=Offset.REGION_SIZE, value=size
            )
        if fd_offset % mmap.ALLOCATIONGRANULARITY:
            raise FieldValueError(
                f"the descriptor offset is not a multiple of {mmap.ALLOCATIONGRANULARITY}",
                field="fd_offset",
                offset=Offset.REGION_FD_OFFSET,
                value=fd_offset,
            )
    return RegionFrame(guest_physical, size, fd_offset, bool(flags & READ_ONLY), bool(flags & UNMAP))


async def share_region(
    transport: UnixTransport, guest_physical: int, fd: int, size: int, *, fd_offset: int = 0, read_only: bool = False
) -> None:
    """VMM side: let the service map ``size`` bytes of ``fd`` at ``guest_physical`` (the caller keeps ``fd``).

    Sent in order with the intercepts: those sent after it can use the
    region. The service answers only a failure, with an error completion
    addressed to VP 0xFFFF_FFFF (see PROTOCOL.md).
    """
    await transport.send_fds(encode_region(guest_physical, size, fd_offset=fd_offset, read_only=read_only), [fd])


async def unshare_region(transport: Transport, guest_physical: int) -> None:
    """VMM side: remove the region that starts at ``guest_physical``."""
    await transport.send_batch([encode_unmap(guest_physical)])


def _error(status: Status, detail: int) -> bytes:
    return pack_completion(0, UNKNOWN_VP, status, Registers.NONE, 0, 0, detail=detail)


class SharedMemoryTransport(Transport):
    """A UNIX connection whose region frames build the guest memory string I/O uses (its ``guest``).

    Everything else passes through unchanged. Closing it unmaps the regions.
    """

    stops_reading = True

    def __init__(self, transport: UnixTransport, *, max_regions: int = MAX_REGIONS) -> None:
        self.transport = transport
        self.guest_memory = BufferMemory()
        self._guest = Guest(self.guest_memory)
        self.max_regions = max_regions
        self._maps: dict[int, mmap.mmap] = {}
        self._pending: list[bytes] = []

    @property
    def name(self) -> str:
        return self.transport.name

    async def receive_batch(self) -> list[bytes]:
        while True:
            frames, self._pending = self._pending or await self.transport.receive_batch(), []
            if not frames:
                return []
            # Apply the region frames at the head, pass on the frames up to the
            # next region frame and keep the rest: an intercept sees exactly
            # the regions sent before it.
            replies = []
            start = 0
            while start < len(frames) and message_type(frames[start]) == REGION:
                reply = self._apply(frames[start])
                if reply is not None:
                    replies.append(reply)
                start += 1
            end = start
            while end < len(frames) and message_type(frames[end]) != REGION:
                end += 1
            self._pending = frames[end:]
            if replies:
                await self.transport.send_batch(replies)
            if end > start:
                return frames[start:end]

    def _apply(self, frame: bytes) -> bytes | None:
        # A descriptor travels with every mapping frame, even a malformed one:
        # take it first, so the descriptor queue stays in step with the frames.
        fd = self.transport.take_fds(1)[0] if carries_descriptor(frame) else -1
        try:
            region = decode_region(frame)
            if region.unmap:
                self._unmap(region.guest_physical)
            else:
                self._map(region, fd)
        except FrameError as error:
            log.warning("%s: rejected a region frame: %s", self.name, error)
            return _error(Status.PROTOCOL_ERROR, error.offset)
        except OSError as error:
            log.warning("%s: cannot map guest memory: %s", self.name, error)
            return _error(Status.MEMORY_ERROR, error.errno or errno.EINVAL)
        finally:
            if fd >= 0:
                os.close(fd)  # a mapping keeps the memory alive without it
        return None

    def _map(self, region: RegionFrame, fd: int) -> None:
        if len(self._maps) >= self.max_regions:
            raise OSError(errno.ENOSPC, f"more than {self.max_regions} regions")
        available = os.fstat(fd).st_size
        if available < region.fd_offset + region.size:
            # Touching a shared mapping past the end of its file would raise SIGBUS.
            raise OSError(errno.EINVAL, f"the descriptor holds {available} bytes, the region needs "
                                        f"{region.fd_offset + region.size}")  # fmt: skip
        protection = mmap.PROT_READ if region.read_only else mmap.PROT_READ | mmap.PROT_WRITE
        mapping = mmap.mmap(fd, region.size, flags=mmap.MAP_SHARED, prot=protection, offset=region.fd_offset)
        try:
            self.guest_memory.add(region.guest_physical, mapping, writable=not region.read_only)
        except ValueError as error:
            mapping.close()
            raise OSError(errno.EEXIST, str(error)) from None
        self._maps[region.guest_physical] = mapping
        log.info("%s: guest memory %#x+%#x mapped%s", self.name, region.guest_physical, region.size,
                 " read-only" if region.read_only else "")  # fmt: skip

    def _unmap(self, guest_physical: int) -> None:
        mapping = self._maps.pop(guest_physical, None)
        if mapping is None:
            raise OSError(errno.ENOENT, f"no region starts at {guest_physical:#x}")
        self.guest_memory.remove(guest_physical)
        mapping.close()

    @property
    def guest(self) -> Guest:
        """The regions the VMM shared, as string I/O's guest memory."""
        return self._guest

    def stop_reading(self) -> None:
        """Stop reading; the frames that had arrived are still delivered (see ``FdStreamTransport``)."""
        self.transport.stop_reading()

    async def send_batch(self, frames: Sequence[bytes]) -> None:
        await self.transport.send_batch(frames)

    async def aclose(self) -> None:
        try:
            await self.transport.aclose()
        finally:
            for guest_physical in list(self._maps):
                self._unmap(guest_physical)


def with_shared_memory(transport: Transport) -> Transport:
    """Wrap a UNIX socket connection so its VMM can share guest memory; other transports cannot carry it."""
    return SharedMemoryTransport(transport) if isinstance(transport, UnixTransport) else transport
