"""Guest memory shared over a UNIX socket: memfd regions passed with SCM_RIGHTS.

The VMM sends one "memory region" frame per guest-physical range, with the
descriptor of the memory behind it (a memfd sealed against shrinking)
attached, as vhost-user's memory table and vfio-user's DMA map do; the
service maps it and string I/O on that connection reads and writes the
guest's own memory. The layout is in docs/PROTOCOL.md ("Guest memory
regions").

VMM side::

    fd = memfd_for_sharing("ram", size)  # MFD_ALLOW_SEALING, size set, F_SEAL_SHRINK
    await share_region(client.transport, 0, fd, size)

Service side, :func:`with_shared_memory` wraps each UNIX connection in a
:class:`SharedMemoryTransport`, whose declared ``guest`` the
:class:`~dispatcher.Dispatcher` uses for that connection. Region frames
never reach the engine. A region is applied when the frames before it have
been handed on, so intercepts see exactly the regions sent before them.

What the service refuses, so that guest memory cannot hurt it:

- a descriptor without the ``F_SEAL_SHRINK`` seal (or one that cannot be
  sealed, such as a plain file): a file shrunk under a mapping would kill
  the service with SIGBUS at the next access;
- more regions, or more mapped bytes, than the VM's :class:`RegionBudget`
  allows (64 regions and 64 GiB by default), counted over every connection
  of the VM.

A mapped region keeps no descriptor open: the one received is closed as
soon as the mapping exists.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import platform
import sys
import threading
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import anyio
import anyio.lowlevel

from dispatcher import (
    REGION,
    UNKNOWN_VP,
    BufferMemory,
    DispatchError,
    FieldValueError,
    FrameError,
    Guest,
    Registers,
    Status,
    Transport,
)
from dispatcher.device_lock import Acquire
from dispatcher.transport import InlineAnswer
from dispatcher.wire import HEADER_SIZE, REGION_STRUCT, Offset, check_header, message_type, pack_completion

from .unix import UnixTransport

__all__ = [
    "MAX_BYTES",
    "MAX_REGIONS",
    "REGION",
    "REGION_VERSION",
    "RegionBudget",
    "RegionFrame",
    "RegionLimitError",
    "RegionRefusedError",
    "SharedMemoryTransport",
    "UnsealedRegionError",
    "carries_descriptor",
    "decode_region",
    "encode_region",
    "encode_unmap",
    "memfd_for_sharing",
    "seal_against_shrinking",
    "share_region",
    "unshare_region",
    "with_shared_memory",
]

log = logging.getLogger("intercept_dispatch.transports")

REGION_VERSION = 1
"""The version a region frame carries; a frame of another version is refused."""
MAX_REGIONS = 64
"""Regions one VM may have mapped at once, over all its connections (the default of :class:`RegionBudget`)."""
MAX_BYTES = 64 << 30
"""Bytes one VM may have mapped at once, over all its connections (the default of :class:`RegionBudget`)."""
UNMAP_WAIT = 5.0
"""Seconds a closing connection waits for its VM's lock to unmap its regions."""

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


class RegionRefusedError(DispatchError):
    """The service will not map a region; ``errno`` is the Detail of the error completion it answers."""

    def __init__(self, message: str, *, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class UnsealedRegionError(RegionRefusedError):
    """The descriptor is not sealed with ``F_SEAL_SHRINK`` (or cannot be sealed at all): errno EBADFD."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno=errno.EBADFD)


class RegionLimitError(RegionRefusedError):
    """A region over the VM's budget; ``limit`` is ``"regions"`` (errno ENOSPC) or ``"bytes"`` (errno EDQUOT)."""

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message, errno=errno.ENOSPC if limit == "regions" else errno.EDQUOT)
        self.limit = limit


class RegionBudget:
    """How much guest memory one VM may map: regions and bytes, shared by every connection of the VM.

    The service makes one per VM and passes it to :func:`with_shared_memory`
    for each of that VM's connections. Thread-safe: connections answered on
    their own threads reserve and release from it.
    """

    def __init__(self, max_regions: int = MAX_REGIONS, max_bytes: int = MAX_BYTES) -> None:
        if max_regions < 0 or max_bytes < 0:
            raise ValueError(f"region limits cannot be negative: {max_regions} regions, {max_bytes} bytes")
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self._regions = 0
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def regions(self) -> int:
        """Regions mapped now."""
        return self._regions

    @property
    def bytes(self) -> int:
        """Bytes mapped now."""
        return self._bytes

    def reserve(self, size: int) -> None:
        """Count one more region of ``size`` bytes, or raise :class:`RegionLimitError` naming the limit."""
        with self._lock:
            if self._regions >= self.max_regions:
                raise RegionLimitError(
                    f"the VM has {self._regions} regions mapped, its limit is {self.max_regions}", limit="regions"
                )
            if size > self.max_bytes - self._bytes:
                raise RegionLimitError(
                    f"a region of {size} bytes is over the VM's limit of {self.max_bytes} mapped bytes "
                    f"({self._bytes} in use)",
                    limit="bytes",
                )
            self._regions += 1
            self._bytes += size

    def release(self, size: int) -> None:
        """Give back one region of ``size`` bytes."""
        with self._lock:
            self._regions -= 1
            self._bytes -= size

    def __repr__(self) -> str:
        return (f"RegionBudget({self._regions}/{self.max_regions} regions, "
                f"{self._bytes}/{self.max_bytes} bytes)")  # fmt: skip


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


def _seals(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as error:
        raise UnsealedRegionError(
            f"descriptor {fd} cannot be sealed (F_GET_SEALS: {error.strerror}); share a memfd sealed with F_SEAL_SHRINK"
        ) from None


def seal_against_shrinking(fd: int) -> None:
    """VMM side: add ``F_SEAL_SHRINK`` to ``fd`` unless it has it, so the service will map it.

    Raises :class:`UnsealedRegionError` naming the seal when ``fd`` cannot
    take it: a plain file, or a memfd made without ``MFD_ALLOW_SEALING``.
    """
    seals = _seals(fd)
    if seals & fcntl.F_SEAL_SHRINK:
        return
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError as error:
        raise UnsealedRegionError(
            f"descriptor {fd} cannot take F_SEAL_SHRINK ({error.strerror}): make the memfd with MFD_ALLOW_SEALING"
        ) from None


def memfd_for_sharing(name: str, size: int) -> int:
    """VMM side: a new memfd of ``size`` bytes, sealed with ``F_SEAL_SHRINK``, ready for :func:`share_region`.

    It may still grow; it can never shrink, so a mapping of it stays whole.
    The caller owns (and closes) the descriptor.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def share_region(
    transport: UnixTransport, guest_physical: int, fd: int, size: int, *, fd_offset: int = 0, read_only: bool = False
) -> None:
    """VMM side: let the service map ``size`` bytes of ``fd`` at ``guest_physical`` (the caller keeps ``fd``).

    ``fd`` is sealed with ``F_SEAL_SHRINK`` first if it is not yet
    (:func:`seal_against_shrinking`): the service refuses memory that
    could shrink under its mapping. Sent in order with the intercepts: those
    sent after it can use the region. The service answers only a failure,
    with an error completion addressed to VP 0xFFFF_FFFF (see PROTOCOL.md).
    """
    seal_against_shrinking(fd)
    await transport.send_fds(encode_region(guest_physical, size, fd_offset=fd_offset, read_only=read_only), [fd])


async def unshare_region(transport: Transport, guest_physical: int) -> None:
    """VMM side: remove the region that starts at ``guest_physical``."""
    await transport.send_batch([encode_unmap(guest_physical)])


def _error(status: Status, detail: int) -> bytes:
    return pack_completion(0, UNKNOWN_VP, status, Registers.NONE, 0, 0, detail=detail)


# Mapping without keeping a descriptor. CPython before 3.13 duplicates the
# descriptor into every mmap object and holds it until the mapping closes: 64
# regions would hold 64 descriptors. 3.13 has trackfd=False. Before it, a
# Python mmap of anonymous memory is made and the file is mapped over it with
# MAP_FIXED through libc: the mmap object still owns the range (it unmaps it
# when closed, refuses to close while a buffer of it is in use, and raises
# ValueError once closed), so no access can touch unmapped memory, which a
# bare ctypes buffer over a mapping of our own could not promise.


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


# Values the mmap module lacks before 3.13 (MAP_NORESERVE) or at all (MAP_FIXED): MAP_FIXED is 0x10 on x86, arm,
# riscv, powerpc, s390 and mips; MAP_NORESERVE is 0x4000 on the first four's generic layout, 0x40 on powerpc.
_MAP_FIXED = 0x10
_MAP_NORESERVE: int = getattr(mmap, "MAP_NORESERVE", 0x40 if platform.machine().startswith("ppc") else 0x4000)
_MAP_FAILED = ctypes.c_void_p(-1).value
_libc: Any = None


def _address(mapping: mmap.mmap) -> int:
    # Through the buffer protocol, which works for a read-only mmap too
    # (ctypes' from_buffer wants a writable one); released at once.
    view = _PyBuffer()
    get_buffer = ctypes.pythonapi.PyObject_GetBuffer
    get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
    get_buffer.restype = ctypes.c_int
    release = ctypes.pythonapi.PyBuffer_Release
    release.argtypes = (ctypes.POINTER(_PyBuffer),)
    release.restype = None
    if get_buffer(mapping, ctypes.byref(view), 0) != 0:
        raise OSError(errno.EINVAL, "cannot find the mapping's address")
    try:
        return int(view.buf or 0)
    finally:
        release(ctypes.byref(view))


def _libc_mmap() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int64)  # fmt: skip
        libc.mmap.restype = ctypes.c_void_p
        _libc = libc
    return _libc.mmap


def _map_shared(fd: int, size: int, offset: int, *, writable: bool) -> mmap.mmap:
    """Map ``size`` bytes of ``fd`` from ``offset`` (MAP_SHARED) as an mmap object that keeps no descriptor."""
    prot = mmap.PROT_READ | mmap.PROT_WRITE if writable else mmap.PROT_READ
    if sys.version_info >= (3, 13):
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=offset, trackfd=False)
    # MAP_NORESERVE: the placeholder is replaced at once, so it must not be
    # charged as private memory the size of the whole region.
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE, prot=prot)
    try:
        address = _address(mapping)
        result = _libc_mmap()(address, size, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
        if result is None or result == _MAP_FAILED:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        if result != address:  # MAP_FIXED maps there or fails; anything else would be a broken libc
            raise OSError(errno.EFAULT, f"mmap answered {result:#x}, not {address:#x}")
    except BaseException:
        mapping.close()
        raise
    return mapping


class SharedMemoryTransport(Transport):
    """A UNIX connection whose region frames build the guest memory string I/O uses (its ``guest``).

    Everything else passes through unchanged. Closing it unmaps the regions.
    ``budget`` is the VM's :class:`RegionBudget`, shared with its other
    connections (a budget of its own by default). ``lock`` is held while a
    region is mapped or unmapped: the VM's ``Dispatcher.lock``, so no device
    code of the VM reads guest memory meanwhile.
    """

    stops_reading = True
    answers_inline: ClassVar[bool] = UnixTransport.answers_inline
    """As the UNIX transport it wraps: region frames are then applied on its reader thread."""

    def __init__(
        self,
        transport: UnixTransport,
        *,
        budget: RegionBudget | None = None,
        lock: threading.RLock | threading.Lock | None = None,
    ) -> None:
        self.transport = transport
        self.guest_memory = BufferMemory()
        self._guest = Guest(self.guest_memory)
        self.budget = budget if budget is not None else RegionBudget()
        self._lock = lock if lock is not None else threading.RLock()
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

    def start_inline(self, answer: InlineAnswer) -> None:
        """Answer on the UNIX transport's reader thread; region frames are applied there, in stream order.

        ``answer`` sees every frame but the region frames, in runs cut at
        each region frame, so an intercept sees exactly the regions sent
        before it; the error replies of refused region frames are sent in
        their place among the completions.
        """

        def answer_around_regions(frames: Sequence[bytes]) -> list[bytes]:
            out: list[bytes] = []
            start, count = 0, len(frames)
            while start < count:
                if message_type(frames[start]) == REGION:
                    reply = self._apply(frames[start])
                    if reply is not None:
                        out.append(reply)
                    start += 1
                    continue
                end = start + 1
                while end < count and message_type(frames[end]) != REGION:
                    end += 1
                out += answer(frames[start:end])
                start = end
            return out

        self.transport.start_inline(answer_around_regions)

    def _apply(self, frame: bytes) -> bytes | None:
        # A descriptor travels with every mapping frame, even a malformed one:
        # take it first, so the descriptor queue stays in step with the frames.
        fd = self.transport.take_fds(1)[0] if carries_descriptor(frame) else -1
        try:
            region = decode_region(frame)
            with self._lock:
                if region.unmap:
                    self._unmap(region.guest_physical)
                else:
                    self._map(region, fd)
        except FrameError as error:
            log.warning("%s: rejected a region frame: %s", self.name, error)
            return _error(Status.PROTOCOL_ERROR, error.offset)
        except RegionRefusedError as error:
            log.warning("%s: cannot map guest memory: %s", self.name, error)
            return _error(Status.MEMORY_ERROR, error.errno)
        except OSError as error:
            log.warning("%s: cannot map guest memory: %s", self.name, error)
            return _error(Status.MEMORY_ERROR, error.errno or errno.EINVAL)
        finally:
            if fd >= 0:
                os.close(fd)  # the mapping keeps the memory alive without it
        return None

    def _map(self, region: RegionFrame, fd: int) -> None:
        if not _seals(fd) & fcntl.F_SEAL_SHRINK:
            # Touching a shared mapping past the end of its file raises SIGBUS:
            # a descriptor that could shrink later is never mapped.
            raise UnsealedRegionError(f"the descriptor is not sealed with F_SEAL_SHRINK (region at "
                                      f"{region.guest_physical:#x})")  # fmt: skip
        available = os.fstat(fd).st_size
        if available < region.fd_offset + region.size:
            raise OSError(errno.EINVAL, f"the descriptor holds {available} bytes, the region needs "
                                        f"{region.fd_offset + region.size}")  # fmt: skip
        self.budget.reserve(region.size)
        try:
            mapping = _map_shared(fd, region.size, region.fd_offset, writable=not region.read_only)
            try:
                self.guest_memory.add(region.guest_physical, mapping, writable=not region.read_only)
            except ValueError as error:
                mapping.close()
                raise OSError(errno.EEXIST, str(error)) from None
        except BaseException:
            self.budget.release(region.size)
            raise
        self._maps[region.guest_physical] = mapping
        # DEBUG: a VMM mapping and unmapping in a loop must not fill the log.
        log.debug("%s: guest memory %#x+%#x mapped%s", self.name, region.guest_physical, region.size,
                  " read-only" if region.read_only else "")  # fmt: skip

    def _unmap(self, guest_physical: int) -> None:
        mapping = self._maps.pop(guest_physical, None)
        if mapping is None:
            raise OSError(errno.ENOENT, f"no region starts at {guest_physical:#x}")
        self.guest_memory.remove(guest_physical)
        self.budget.release(len(mapping))
        try:
            mapping.close()
        except BufferError:
            # A buffer of it is still in use: the mapping goes when that buffer does.
            log.debug("%s: guest memory %#x unmapped once no longer in use", self.name, guest_physical)

    @property
    def guest(self) -> Guest:
        """The regions the VMM shared, as string I/O's guest memory."""
        return self._guest

    @property
    def regions(self) -> int:
        """Regions this connection has mapped."""
        return len(self._maps)

    def stop_reading(self) -> None:
        """Stop reading; the frames that had arrived are still delivered (see ``FdStreamTransport``)."""
        self.transport.stop_reading()

    async def send_batch(self, frames: Sequence[bytes]) -> None:
        await self.transport.send_batch(frames)

    async def aclose(self) -> None:
        try:
            await self.transport.aclose()
        finally:
            # A hung handler may hold the VM's lock for good: wait for it without blocking the event loop, and
            # give up after a while (the mappings then stay until the process, being replaced, exits).
            with anyio.move_on_after(UNMAP_WAIT):
                await Acquire(self._lock, anyio.lowlevel.checkpoint)
                try:
                    for guest_physical in list(self._maps):
                        self._unmap(guest_physical)
                finally:
                    self._lock.release()


def with_shared_memory(
    transport: Transport,
    budget: RegionBudget | None = None,
    *,
    lock: threading.RLock | threading.Lock | None = None,
) -> Transport:
    """Wrap a UNIX socket connection so its VMM can share guest memory; other transports cannot carry it.

    ``budget``: the VM's :class:`RegionBudget`, the same object for every
    connection of that VM (without it, the connection has a budget of its
    own). ``lock``: the VM's ``Dispatcher.lock`` (see
    :class:`SharedMemoryTransport`).
    """
    if isinstance(transport, UnixTransport):
        return SharedMemoryTransport(transport, budget=budget, lock=lock)
    return transport
