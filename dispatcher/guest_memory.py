"""Guest-physical memory as a device backend sees it: regions, bounds-checked.

String I/O (INS/OUTS) reads and writes guest memory; so may a device doing
DMA. :class:`GuestMemory` is the interface; :class:`BufferMemory` is the
in-process implementation over ``bytearray`` or ``mmap`` buffers (a memfd
shared by a VMM is mapped and added the same way). An access that is not
wholly backed raises :class:`~dispatcher.errors.GuestMemoryError` before any
byte is touched.
"""

from __future__ import annotations

import abc
import enum
import mmap
from bisect import bisect_right
from collections.abc import Iterable
from typing import NamedTuple, TypeAlias

from .errors import GuestMemoryError

__all__ = ["Buffer", "BufferMemory", "GuestMemory", "MemoryFault", "MemoryRegion"]

Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap
_ADDRESS_LIMIT = 1 << 64


class MemoryFault(enum.IntEnum):
    """Why a string access faults: the Detail of a MEMORY_ERROR completion."""

    UNMAPPED = 1  # guest-physical bytes outside every region
    READ_ONLY = 2  # INS into a read-only region
    SEGMENT = 3  # #GP(0): segment limit, null or unusable segment, wrong segment type
    ALIGNMENT = 4  # #AC(0): CR0.AM, RFLAGS.AC, CPL 3 and a misaligned element
    TRANSLATION = 5  # the translation hook found no mapping (a #PF for the VMM to raise)


class MemoryRegion(NamedTuple):
    """A guest-physical range backed by memory. ``writable`` is False for a ROM."""

    guest_physical: int
    size: int
    writable: bool = True

    @property
    def end(self) -> int:
        """First guest-physical address after the region."""
        return self.guest_physical + self.size


class GuestMemory(abc.ABC):
    """Guest-physical memory: the regions that exist and bounds-checked access to them."""

    @abc.abstractmethod
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The regions, sorted by address; they never overlap."""

    @abc.abstractmethod
    def check(self, address: int, length: int, *, write: bool = False) -> int:
        """0 if every byte of ``[address, address+length)`` is backed (and writable for a
        write), else the :class:`MemoryFault` that a string access there would report."""

    @abc.abstractmethod
    def read(self, address: int, length: int) -> bytes:
        """Copy ``length`` bytes from ``address``; raise ``GuestMemoryError`` if any is not backed."""

    @abc.abstractmethod
    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``address``; if any byte is not backed or not writable, raise
        ``GuestMemoryError`` and write nothing."""


class BufferMemory(GuestMemory):
    """Guest memory on Python buffers (``bytearray``, ``mmap``, ``memoryview``, or ``bytes`` for a ROM).

    The buffers are used in place, so the owner (a VMM, or a test acting as
    the guest) sees every write at once. Regions may be added and removed
    while in use; an access may span adjacent regions.
    """

    def __init__(self, regions: Iterable[tuple[int, Buffer]] = ()) -> None:
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, Buffer, bool]] = []
        for address, buffer in regions:
            self.add(address, buffer)

    def add(self, guest_physical: int, buffer: Buffer, *, writable: bool | None = None) -> MemoryRegion:
        """Back ``len(buffer)`` bytes from ``guest_physical`` with ``buffer``.

        ``writable`` defaults to whether the buffer can be written. Raises
        ``ValueError`` for an empty buffer, a range outside the 64-bit
        space, a read-only buffer asked to be writable, or an overlap.
        """
        if isinstance(buffer, memoryview):
            buffer = buffer.cast("B")
        with memoryview(buffer) as view:
            size, readonly = view.nbytes, view.readonly
        if writable is None:
            writable = not readonly
        elif writable and readonly:
            raise ValueError(f"region at {guest_physical:#x}: a read-only buffer cannot back a writable region")
        end = guest_physical + size
        if size == 0 or guest_physical < 0 or end > _ADDRESS_LIMIT:
            raise ValueError(f"region {guest_physical:#x}+{size:#x} is empty or outside the 64-bit space")
        index = bisect_right(self._starts, guest_physical)
        before = self._entries[index - 1] if index else None
        after = self._entries[index] if index < len(self._entries) else None
        for other in (before, after):
            if other is not None and guest_physical < other[1] and other[0] < end:
                raise ValueError(
                    f"region {guest_physical:#x}+{size:#x} overlaps {other[0]:#x}+{other[1] - other[0]:#x}"
                )
        self._starts.insert(index, guest_physical)
        self._entries.insert(index, (guest_physical, end, buffer, writable))
        return MemoryRegion(guest_physical, size, writable)

    def remove(self, guest_physical: int) -> Buffer:
        """Remove the region that starts at ``guest_physical``; return its buffer."""
        index = bisect_right(self._starts, guest_physical) - 1
        if index < 0 or self._starts[index] != guest_physical:
            raise ValueError(f"no region starts at {guest_physical:#x}")
        del self._starts[index]
        return self._entries.pop(index)[2]

    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(MemoryRegion(start, end - start, writable) for start, end, _, writable in self._entries)

    def _pieces(self, address: int, length: int, write: bool) -> list[tuple[Buffer, int, int]] | int:
        # (buffer, offset, length) pieces covering the range, or a MemoryFault.
        index = bisect_right(self._starts, address) - 1
        if index < 0 or address < 0:
            return MemoryFault.UNMAPPED
        entries = self._entries
        start, end, buffer, writable = entries[index]
        pieces: list[tuple[Buffer, int, int]] = []
        while length > 0:
            if address >= end:
                return MemoryFault.UNMAPPED
            if write and not writable:
                return MemoryFault.READ_ONLY
            n = min(length, end - address)
            pieces.append((buffer, address - start, n))
            address += n
            length -= n
            index += 1
            if length and index < len(entries):
                start, end, buffer, writable = entries[index]
                if start != address:
                    return MemoryFault.UNMAPPED
            elif length:
                return MemoryFault.UNMAPPED
        return pieces

    def check(self, address: int, length: int, *, write: bool = False) -> int:
        if length <= 0:
            return 0
        # The common case inline: the whole range inside one region.
        index = bisect_right(self._starts, address) - 1
        if index >= 0 and address >= 0:
            _, end, _, writable = self._entries[index]
            if address + length <= end:
                return MemoryFault.READ_ONLY if write and not writable else 0
        pieces = self._pieces(address, length, write)
        return pieces if isinstance(pieces, int) else 0

    def read(self, address: int, length: int) -> bytes:
        # The common case inline: the whole range inside one region.
        index = bisect_right(self._starts, address) - 1
        if index >= 0 and address >= 0 and length > 0:
            start, end, buffer, _ = self._entries[index]
            if address + length <= end:
                return bytes(buffer[address - start : address - start + length])
        if length <= 0:
            if length < 0:
                raise GuestMemoryError("negative length", address=address, length=length)
            return b""
        pieces = self._pieces(address, length, False)
        if isinstance(pieces, int):
            raise GuestMemoryError("not backed by any region", address=address, length=length)
        return b"".join(bytes(buffer[offset : offset + n]) for buffer, offset, n in pieces)

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        if isinstance(data, memoryview):
            data = data.cast("B")
        length = len(data)
        if not length:
            return
        index = bisect_right(self._starts, address) - 1
        if index >= 0 and address >= 0:
            start, end, buffer, writable = self._entries[index]
            if address + length <= end and writable:
                buffer[address - start : address - start + length] = data  # type: ignore[index]
                return
        pieces = self._pieces(address, length, True)
        if isinstance(pieces, int):
            reason = "read-only" if pieces == MemoryFault.READ_ONLY else "not backed by any region"
            raise GuestMemoryError(reason, address=address, length=length)
        position = 0
        for buffer, offset, n in pieces:
            buffer[offset : offset + n] = data[position : position + n]  # type: ignore[index]
            position += n
