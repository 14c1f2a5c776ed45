"""BufferMemory: regions, bounds checks, nothing touched on error."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher import BufferMemory, GuestMemoryError, MemoryFault, MemoryRegion


def test_reads_and_writes_go_to_the_buffers_in_place() -> None:
    low, high = bytearray(0x1000), bytearray(0x1000)
    memory = BufferMemory([(0x1000, low), (0x2000, high)])
    memory.write(0x1FFE, b"abcd")  # spans the two adjacent regions
    assert low[-2:] == b"ab" and high[:2] == b"cd"
    assert memory.read(0x1FFC, 6) == b"\0\0abcd"
    assert memory.regions() == (MemoryRegion(0x1000, 0x1000), MemoryRegion(0x2000, 0x1000))


def test_an_access_outside_every_region_raises_and_touches_nothing() -> None:
    buffer = bytearray(0x1000)
    memory = BufferMemory([(0x1000, buffer)])
    for address, length in ((0xFFF, 2), (0x1FFF, 2), (0x3000, 1), (-1, 1)):
        assert memory.check(address, length, write=True) == MemoryFault.UNMAPPED
        with pytest.raises(GuestMemoryError):
            memory.write(address, b"\x01" * length)
        with pytest.raises(GuestMemoryError):
            memory.read(address, length)
    assert not any(buffer)


def test_a_read_only_region_refuses_writes() -> None:
    memory = BufferMemory()
    memory.add(0xF0000, b"\xea" * 0x100)  # bytes: read-only by nature
    ram = bytearray(0x100)
    memory.add(0xEFF00, ram)
    assert memory.check(0xF0000, 1) == 0
    assert memory.check(0xEFFFF, 2, write=True) == MemoryFault.READ_ONLY
    with pytest.raises(GuestMemoryError, match="read-only"):
        memory.write(0xEFFFF, b"xy")
    assert ram[-1] == 0  # nothing written, not even the writable half
    with pytest.raises(ValueError, match="read-only buffer"):
        memory.add(0x10_0000, b"rom", writable=True)


def test_regions_may_not_overlap_and_can_be_removed() -> None:
    memory = BufferMemory([(0x1000, bytearray(0x1000))])
    with pytest.raises(ValueError, match="overlaps"):
        memory.add(0x1800, bytearray(0x1000))
    with pytest.raises(ValueError, match="overlaps"):
        memory.add(0x0800, bytearray(0x1000))
    memory.remove(0x1000)
    assert memory.regions() == () and memory.check(0x1000, 1) == MemoryFault.UNMAPPED
    with pytest.raises(ValueError, match="no region"):
        memory.remove(0x1000)


def test_an_mmap_backs_a_region() -> None:
    with mmap.mmap(-1, 0x2000) as mapping:
        memory = BufferMemory([(0, mapping)])
        memory.write(0x10, b"shared")
        assert mapping[0x10:0x16] == b"shared"
        memory.remove(0)


@given(
    st.lists(st.tuples(st.integers(0, 0x40), st.integers(1, 0x20)), min_size=1, max_size=4),
    st.integers(0, 0x200),
    st.integers(0, 0x40),
)
def test_check_agrees_with_a_byte_by_byte_model(layout: list[tuple[int, int]], address: int, length: int) -> None:
    # Regions laid out with gaps; a range is accessible iff every byte lies in some region.
    memory = BufferMemory()
    backed: set[int] = set()
    position = 0
    for gap, size in layout:
        position += gap
        memory.add(position, bytearray(size))
        backed.update(range(position, position + size))
        position += size
    expected = all(a in backed for a in range(address, address + length))
    assert (memory.check(address, length) == 0) == expected
    if expected:
        memory.write(address, bytes(range(length)))
        assert memory.read(address, length) == bytes(range(length))
