"""A KVM VM's memory as the dispatcher sees it, and guest-linear reads through a vCPU's paging."""

from __future__ import annotations

import mmap
from collections.abc import Callable, Sequence

from dispatcher import BufferMemory, GuestMemoryError

from .vm import PAGE_SIZE, MemorySlot, Vm

__all__ = ["LinearReader", "vm_memory"]


def vm_memory(vm: Vm) -> BufferMemory:
    """Guest-physical memory over the VM's slots: RAM writable, ROM read-only (as the guest sees it).

    The buffers are the VMM's own mappings of the memfds, so what a string
    I/O handler writes is what the guest reads.
    """
    memory = BufferMemory()
    for region in vm.regions:
        memory.add(region.guest_phys_addr, region.mem, writable=not region.readonly)
    return memory


class LinearReader:
    """Reads guest-linear memory for one vCPU: identity below paging, ``translate`` with it.

    ``translate(linear)`` gives the guest-physical address or None; it is
    called only while ``paging`` is true, once per page touched.
    """

    def __init__(
        self, memory: BufferMemory, slots: Sequence[MemorySlot], translate: Callable[[int], int | None]
    ) -> None:
        self.memory = memory
        self.translate = translate
        self.paging = False
        self._slots = [(slot.guest_phys_addr, slot.end, slot.mem) for slot in slots]
        # The slot of the last read: code and data are mostly in one, and a slice of it is the fast path.
        self._start, self._end, self._buffer = self._slots[0] if self._slots else (0, 0, mmap.mmap(-1, 1))

    def physical(self, linear: int) -> int | None:
        """The guest-physical address of ``linear``, or None if the page tables map nothing there."""
        return self.translate(linear) if self.paging else linear

    def _physical_read(self, address: int, length: int) -> bytes | None:
        start = self._start
        if start <= address and address + length <= self._end:
            return self._buffer[address - start : address - start + length]
        for slot in self._slots:
            if slot[0] <= address < slot[1]:
                self._start, self._end, self._buffer = slot
                break
        try:
            return self.memory.read(address, length)
        except GuestMemoryError:
            return None

    def read(self, linear: int, length: int) -> bytes | None:
        """``length`` bytes from ``linear``, or None if any of them is not backed."""
        if not self.paging:
            return self._physical_read(linear, length)
        parts = []
        while length > 0:
            n = min(length, PAGE_SIZE - (linear & (PAGE_SIZE - 1)))
            physical = self.translate(linear)
            data = self._physical_read(physical, n) if physical is not None else None
            if data is None:
                return None
            parts.append(data)
            linear += n
            length -= n
        return b"".join(parts)

    def read_upto(self, linear: int, length: int) -> bytes:
        """The longest readable prefix of ``length`` bytes from ``linear`` (stops at the first unbacked page)."""
        data = self.read(linear, length)
        if data is not None:
            return data
        first = min(length, PAGE_SIZE - (linear & (PAGE_SIZE - 1)))
        head = self.read(linear, first)
        if head is None:
            return b""
        return head + self.read_upto(linear + first, length - first) if first < length else head

    def read_before(self, linear: int, length: int) -> bytes:
        """The longest readable run of up to ``length`` bytes that ends just before ``linear``."""
        data = self.read(linear - length, length) if linear >= length else None
        if data is not None:
            return data
        length = min(length, linear)
        while length > 0:
            data = self.read(linear - length, length)
            if data is not None:
                return data
            length -= 1
        return b""
