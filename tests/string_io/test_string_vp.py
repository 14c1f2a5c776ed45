"""String I/O as guest code sees it: the fake VP's insb/insw/insl/outsb/outsw/outsl through a real Dispatcher."""

from __future__ import annotations

from collections import deque

import anyio
import pytest

from dispatcher import (
    BufferMemory,
    BulkAccess,
    Completion,
    ExecutionState,
    MemoryFault,
    PortAccess,
    Registers,
    Router,
    Segment,
    SegmentAttributes,
    SegmentRegister,
    Status,
    UnsupportedReason,
    on_bulk,
    on_port,
)
from transports.testing import CompletionError, CpuMode, FakePartition

pytestmark = pytest.mark.anyio


class Fifo:
    """A 16-bit data port: reads pop words, writes collect them (an ATA data register, reduced)."""

    io_base = 0x1F0

    def __init__(self, words: list[int]) -> None:
        self.rx = deque(words)
        self.tx: list[int] = []
        self.element_calls = 0

    @on_port(0, count=2)
    def data(self, access: PortAccess) -> int | None:
        self.element_calls += 1
        if access.is_write:
            self.tx.append(access.value)
            return None
        return self.rx.popleft() if self.rx else 0xFFFF


class BulkFifo(Fifo):
    """The same port with a bulk handler: a chunk of words at once."""

    def __init__(self, words: list[int]) -> None:
        super().__init__(words)
        self.chunks: list[int] = []

    @on_bulk(0)
    def data_chunk(self, access: BulkAccess) -> bytes | None:
        self.chunks.append(access.elements)
        if access.is_write:
            self.tx.extend(int.from_bytes(access.data[i : i + access.size], "little")
                           for i in range(0, len(access.data), access.size))  # fmt: skip
            return None
        return b"".join(self.rx.popleft().to_bytes(access.size, "little") for _ in range(access.elements))


def memory_of(size: int = 0x2_0000) -> tuple[bytearray, BufferMemory]:
    buffer = bytearray(size)
    return buffer, BufferMemory([(0, buffer)])


async def test_rep_insw_fills_memory_and_leaves_the_registers_past_it() -> None:
    fifo = Fifo(list(range(0x100, 0x100 + 256)))
    router = Router()
    router.include(fifo)
    buffer, memory = memory_of()
    async with FakePartition(router, memory=memory) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx, rip = 0x8000, 256, vp.rip
        completion = await vp.insw(0x1F0, rep=True)
    assert completion.status is Status.COMPLETED
    assert buffer[0x8000:0x8200] == b"".join(w.to_bytes(2, "little") for w in range(0x100, 0x200))
    assert (vp.rdi, vp.rcx, vp.rip) == (0x8200, 0, rip + 3)  # 66 F3 6D in long mode


class EntryRecorder(FakePartition):
    """A fake partition that notes VP 0's RCX, RDI and RIP each time it enters the dispatcher."""

    def __init__(self, router: Router, *, memory: BufferMemory, max_elements: int, mode: CpuMode) -> None:
        super().__init__(router, memory=memory, max_elements=max_elements, mode=mode)
        self.entries: list[tuple[int, int, int]] = []

    async def exchange(self, vp_index: int, frame: bytes) -> Completion:
        vp = self.vp(vp_index)
        self.entries.append((vp.rcx, vp.rdi, vp.rip))
        return await super().exchange(vp_index, frame)


@pytest.mark.parametrize("mode", list(CpuMode))
async def test_a_chunk_boundary_in_the_middle_of_a_rep(mode: CpuMode) -> None:
    # 10 elements, at most 4 per exit: exits of 4, 4 and 2, and RIP moves only on the last.
    fifo = Fifo(list(range(10)))
    router = Router()
    router.include(fifo)
    buffer, memory = memory_of()
    partition = EntryRecorder(router, memory=memory, max_elements=4, mode=mode)
    async with partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx, rip = 0x100, 10, vp.rip
        await vp.insw(0x1F0, rep=True)
    length = 2 if mode is CpuMode.REAL else 3  # F3 6D, or 66 F3 6D where words need the operand-size prefix
    # The registers at each re-entry, then after the instruction: each completion moved RCX and RDI by a chunk.
    assert partition.entries == [(10, 0x100, rip), (6, 0x108, rip), (2, 0x110, rip)]
    assert (vp.rcx, vp.rdi, vp.rip) == (0, 0x114, rip + length)
    assert buffer[0x100:0x114] == b"".join(i.to_bytes(2, "little") for i in range(10))
    assert fifo.element_calls == 10


async def test_direction_flag_steps_down_and_stores_in_element_order() -> None:
    fifo = Fifo([0x1111, 0x2222, 0x3333])
    router = Router()
    router.include(fifo)
    buffer, memory = memory_of()
    async with FakePartition(router, memory=memory, max_elements=2) as partition:
        vp = partition.vp(0)
        vp.rflags |= 1 << 10
        vp.rdi, vp.rcx = 0x104, 3
        await vp.insw(0x1F0, rep=True)
        assert (vp.rdi, vp.rcx) == (0xFE, 0)
        # The first word read lands at 0x104, the next below it.
        assert buffer[0x100:0x106] == bytes.fromhex("333322221111")
        vp.rsi, vp.rcx = 0x104, 3
        await vp.outsw(0x1F0, rep=True)
    assert fifo.tx == [0x1111, 0x2222, 0x3333] and vp.rsi == 0xFE


async def test_rep_with_rcx_zero_does_nothing_but_advance_rip() -> None:
    fifo = Fifo([1, 2, 3])
    router = Router()
    router.include(fifo)
    buffer, memory = memory_of()
    async with FakePartition(router, memory=memory) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx, rip = 0x100, 0, vp.rip
        completion = await vp.insw(0x1F0, rep=True)
    assert completion.registers == Registers.RIP and vp.rip == rip + 3
    assert fifo.element_calls == 0 and not any(buffer)


async def test_sixteen_bit_offsets_wrap_at_0xffff() -> None:
    # Real mode, ES base 0x10000: INSB at DI = 0xFFFE writes 0x1FFFE, 0x1FFFF, then 0x10000.
    router = Router()
    values = iter([0xA1, 0xA2, 0xA3])
    router.add(lambda access: next(values), 0x60, access="r")
    buffer, memory = memory_of(0x3_0000)
    async with FakePartition(router, memory=memory, mode=CpuMode.REAL, max_elements=2) as partition:
        vp = partition.vp(0)
        vp.es = SegmentRegister(0x1_0000, 0xFFFF, 0x1000, SegmentAttributes(0x93))
        vp.rdi, vp.rcx = 0xABCD_0000_FFFE, 0x5555_0003  # upper bits are not the 16-bit DI and CX
        await vp.insb(0x60, rep=True)
    assert buffer[0x1_FFFE:0x2_0000] == bytes([0xA1, 0xA2]) and buffer[0x1_0000] == 0xA3
    assert buffer[0x2_0000] == 0
    assert vp.rdi == 0xABCD_0000_0001 and vp.rcx == 0x5555_0000  # the upper bits survive


async def test_address_size_prefix_selects_the_32_bit_registers_in_real_mode() -> None:
    router = Router()
    values = iter(range(1, 10))
    router.add(lambda access: next(values), 0x60, access="r")
    buffer, memory = memory_of(0x3_0000)
    async with FakePartition(router, memory=memory, mode=CpuMode.REAL) as partition:
        vp = partition.vp(0)
        vp.es = SegmentRegister(0, 0xFFFF_FFFF, 0, SegmentAttributes(0x93))  # unreal: a 4 GiB limit
        vp.rdi, vp.rcx = 0x0001_FFFF, 3  # EDI runs past 0xFFFF where DI would wrap
        await vp.insb(0x60, rep=True, address_size=32)
    assert buffer[0x1_FFFF:0x2_0002] == bytes([1, 2, 3]) and vp.rdi == 0x2_0002 and vp.rcx == 0
    assert buffer[0:2] == b"\0\0"


async def test_address_size_prefix_in_long_mode_uses_ecx_and_zero_extends() -> None:
    fifo = Fifo([5, 6])
    router = Router()
    router.include(fifo)
    buffer, memory = memory_of()
    async with FakePartition(router, memory=memory) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx = 0xFFFF_FFFF_0000_0200, 0xFFFF_FFFF_0000_0002
        await vp.insw(0x1F0, rep=True, address_size=32)
    assert buffer[0x200:0x204] == bytes([5, 0, 6, 0])
    assert vp.rdi == 0x204 and vp.rcx == 0  # 32-bit results zero-extend into the 64-bit registers


async def test_outs_honours_a_segment_override() -> None:
    router = Router()
    sent: list[int] = []
    router.add(lambda access: sent.append(access.value), 0xE9, access="w")
    buffer, memory = memory_of(0x3_0000)
    buffer[0x1_0010:0x1_0013] = b"CS!"
    buffer[0x2_0010:0x2_0013] = b"ES!"
    buffer[0x0010:0x0013] = b"DS!"
    async with FakePartition(router, memory=memory, mode=CpuMode.PROTECTED) as partition:
        vp = partition.vp(0)
        vp.es = SegmentRegister(0x2_0000, 0xFFFF, 0x18, SegmentAttributes(0xC093))
        vp.cs_attributes = SegmentAttributes(0xC09B)  # a readable code segment
        for segment in (None, Segment.ES):
            vp.rsi, vp.rcx = 0x10, 3
            await vp.outsb(0xE9, rep=True, segment=segment)
    assert bytes(sent) == b"DS!ES!"


async def test_outs_with_an_fs_override_needs_the_vmm_to_supply_fs() -> None:
    router = Router()
    sent: list[int] = []
    router.add(lambda access: sent.append(access.value), 0xE9, access="w")
    buffer, memory = memory_of()
    buffer[0x1234] = 0x5A
    async with FakePartition(router, memory=memory, strict=False) as partition:
        vp = partition.vp(0)
        vp.rsi = 0x234
        completion = await vp.outsb(0xE9, segment=Segment.FS)
        assert completion.status is Status.UNSUPPORTED and completion.detail == UnsupportedReason.SEGMENT_NOT_CARRIED
        assert completion.registers == Registers.NONE and vp.rsi == 0x234
        vp.fs = SegmentRegister(0x1000, 0, 0, SegmentAttributes(0x93))  # in 64-bit mode only the FS base counts
        completion = await vp.outsb(0xE9, segment=Segment.FS)
    assert completion.status is Status.COMPLETED and sent == [0x5A] and vp.rsi == 0x235


async def test_an_element_outside_guest_memory_is_a_memory_error_touching_nothing() -> None:
    fifo = Fifo(list(range(100)))
    router = Router()
    router.include(fifo)
    buffer, memory = memory_of(0x1000)
    async with FakePartition(router, memory=memory, strict=False) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx, rip = 0xFF8, 8, vp.rip  # elements 0-3 fit, element 4 starts at 0x1000
        completion = await vp.insw(0x1F0, rep=True)
    assert completion.status is Status.MEMORY_ERROR and completion.detail == MemoryFault.UNMAPPED
    assert completion.registers == Registers.NONE
    # The four elements before it completed; the fault leaves RIP at the instruction.
    assert (vp.rdi, vp.rcx, vp.rip) == (0x1000, 4, rip)
    assert buffer[0xFF8:] == bytes([0, 0, 1, 0, 2, 0, 3, 0]) and fifo.element_calls == 4


async def test_strict_partition_raises_on_a_memory_error() -> None:
    router = Router()
    router.add(lambda access: 0, 0x60)
    _, memory = memory_of(0x1000)
    async with FakePartition(router, memory=memory) as partition:
        vp = partition.vp(0)
        vp.rdi = 0x5000
        with pytest.raises(CompletionError, match="MEMORY_ERROR"):
            await vp.insb(0x60)


async def test_without_guest_memory_a_string_access_is_unsupported() -> None:
    router = Router()
    router.add(lambda access: 0, 0x60)
    async with FakePartition(router, strict=False) as partition:
        vp = partition.vp(0)
        vp.rcx = 4
        completion = await vp.insb(0x60, rep=True)
    assert completion.status is Status.UNSUPPORTED and completion.detail == UnsupportedReason.NO_GUEST_MEMORY
    assert completion.registers == Registers.NONE and vp.rcx == 4


async def test_long_mode_without_a_translation_hook_is_unsupported() -> None:
    router = Router()
    router.add(lambda access: 0, 0x60)
    _, memory = memory_of()
    async with FakePartition(router, memory=memory, translate=None, strict=False) as partition:
        completion = await partition.vp(0).insb(0x60)
        assert completion.status is Status.UNSUPPORTED and completion.detail == UnsupportedReason.NEEDS_TRANSLATION
        # Real mode never pages: no hook needed.
        completion = await partition.vp(1, mode=CpuMode.REAL).insb(0x60)
    assert completion.status is Status.COMPLETED


async def test_a_translation_hook_maps_each_page() -> None:
    # Linear page n lives at physical page 7 - n: an INSB run across a page boundary lands in two places.
    def translate(partition: int, vp_index: int, linear: int, write: bool) -> int | None:
        page = linear >> 12
        return ((7 - page) << 12) | (linear & 0xFFF) if page < 8 else None

    router = Router()
    values = iter(range(1, 100))
    router.add(lambda access: next(values), 0x60, access="r")
    buffer, memory = memory_of(0x8000)
    async with FakePartition(router, memory=memory, translate=translate, strict=False) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx = 0x1FFE, 4
        await vp.insb(0x60, rep=True)
        assert buffer[0x6FFE:0x7000] == bytes([1, 2]) and buffer[0x5000:0x5002] == bytes([3, 4])
        vp.rdi, vp.rcx = 0x7FFF, 3
        completion = await vp.insb(0x60, rep=True)
    # Linear 0x8000 has no mapping: the element before it completes, then the page fault.
    assert buffer[0x0FFF] == 5
    assert completion.status is Status.MEMORY_ERROR and completion.detail == MemoryFault.TRANSLATION
    assert (vp.rdi, vp.rcx) == (0x8000, 2)


async def test_segment_limit_and_type_checks_in_protected_mode() -> None:
    router = Router()
    router.add(lambda access: 0x77, 0x60)
    buffer, memory = memory_of()
    async with FakePartition(router, memory=memory, mode=CpuMode.PROTECTED, strict=False) as partition:
        vp = partition.vp(0)
        vp.es = SegmentRegister(0x1000, 0x0FFF, 0x18, SegmentAttributes(0xC093))
        vp.rdi, vp.rcx = 0xFFE, 4
        completion = await vp.insb(0x60, rep=True)
        assert completion.status is Status.MEMORY_ERROR and completion.detail == MemoryFault.SEGMENT
        assert (vp.rdi, vp.rcx) == (0x1000, 2) and buffer[0x1FFE:0x2000] == b"\x77\x77"
        for es in (
            SegmentRegister(0, 0xFFFF_FFFF, 0, SegmentAttributes(0xC093)),  # null selector
            SegmentRegister(0, 0xFFFF_FFFF, 0x18, SegmentAttributes(0xC091)),  # read-only data
            SegmentRegister(0, 0xFFFF_FFFF, 0x18, SegmentAttributes(0xC09B)),  # code
            SegmentRegister(0, 0xFFFF_FFFF, 0x18, SegmentAttributes(0xC013)),  # not present
        ):
            vp.es, vp.rdi = es, 0x100
            completion = await vp.insb(0x60)
            assert completion.status is Status.MEMORY_ERROR and completion.detail == MemoryFault.SEGMENT
        # Expand-down: offsets above the limit are the valid ones.
        vp.es = SegmentRegister(0x1_0000, 0x0FFF, 0x18, SegmentAttributes(0xC097))
        vp.rdi = 0x0FFF
        assert (await vp.insb(0x60)).detail == MemoryFault.SEGMENT
        vp.rdi = 0x1000
        assert (await vp.insb(0x60)).status is Status.COMPLETED and buffer[0x1_1000] == 0x77


async def test_alignment_check_at_cpl_3() -> None:
    router = Router()
    router.add(lambda access: 0, 0x60, count=2)
    _, memory = memory_of()
    async with FakePartition(router, memory=memory, mode=CpuMode.PROTECTED, strict=False) as partition:
        vp = partition.vp(0)
        vp.execution_state = ExecutionState(vp.execution_state | 0x3 | 0x8)  # CPL 3, CR0.AM
        vp.rflags |= 1 << 18  # AC
        vp.rdi = 0x101
        assert (await vp.insw(0x60)).detail == MemoryFault.ALIGNMENT
        vp.rdi = 0x100
        assert (await vp.insw(0x60)).status is Status.COMPLETED


async def test_an_unclaimed_port_reads_all_ones_into_memory() -> None:
    _, memory = memory_of()
    async with FakePartition(Router(), memory=memory) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx = 0x10, 3
        await vp.insl(0x1234, rep=True)
    assert memory.read(0x10, 12) == b"\xff" * 12
    assert partition.dispatcher.stats.unclaimed_reads == 3


async def test_elements_straddling_claims_are_split_into_bytes() -> None:
    router = Router()
    router.add(lambda access: 0x11, 0x70, access="r")  # 0x71 is unclaimed
    buffer, memory = memory_of()
    async with FakePartition(router, memory=memory) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx = 0, 2
        await vp.insw(0x70, rep=True)
    assert buffer[:4] == bytes([0x11, 0xFF, 0x11, 0xFF])


async def test_a_bulk_handler_gets_whole_chunks() -> None:
    fifo = BulkFifo(list(range(1000, 1600)))
    router = Router()
    router.include(fifo)
    buffer, memory = memory_of()
    async with FakePartition(router, memory=memory, max_elements=256) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx = 0x4000, 600
        await vp.insw(0x1F0, rep=True)
        vp.rflags |= 1 << 10
        vp.rsi, vp.rcx = 0x4000 + 2 * 599, 600
        await vp.outsw(0x1F0, rep=True)
    assert fifo.chunks == [256, 256, 88] * 2 and fifo.element_calls == 0
    assert buffer[0x4000:0x4004] == (1000).to_bytes(2, "little") + (1001).to_bytes(2, "little")
    assert fifo.tx == list(range(1599, 999, -1))  # DF=1: from the top down


async def test_a_bulk_handler_returning_the_wrong_length_fails_the_chunk() -> None:
    router = Router()
    router.add(lambda access: 0, 0x60)
    router.add_bulk(lambda access: b"\x01", 0x60)
    buffer, memory = memory_of()
    async with FakePartition(router, memory=memory, strict=False) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx, rip = 0x10, 4, vp.rip
        completion = await vp.insb(0x60, rep=True)
    assert completion.status is Status.HANDLER_FAILED
    assert buffer[0x10:0x14] == b"\xff" * 4 and (vp.rdi, vp.rcx, vp.rip) == (0x14, 0, rip + 2)


async def test_a_failing_handler_keeps_the_elements_before_it() -> None:
    calls = []

    def flaky(access: PortAccess) -> int:
        calls.append(access)
        if len(calls) == 3:
            raise RuntimeError("device fell over")
        return len(calls)

    router = Router()
    router.add(flaky, 0x60)
    buffer, memory = memory_of()
    async with FakePartition(router, memory=memory, strict=False, max_elements=5) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx = 0x10, 5
        completion = await vp.insb(0x60, rep=True)
    assert completion.status is Status.HANDLER_FAILED and len(calls) == 3
    assert buffer[0x10:0x15] == bytes([1, 2, 0xFF, 0xFF, 0xFF]) and (vp.rdi, vp.rcx) == (0x15, 0)


@pytest.mark.parametrize("bulk", [False, True])
async def test_async_handlers_run_as_jobs(bulk: bool) -> None:
    router = Router()
    received: list[int] = []

    async def element(access: PortAccess) -> int | None:
        await anyio.sleep(0)
        if access.is_write:
            received.append(access.value)
            return None
        return 0x40 + access.value

    async def chunk(access: BulkAccess) -> bytes | None:
        await anyio.sleep(0)
        if access.is_write:
            received.extend(access.data)
            return None
        return bytes(range(0x40, 0x40 + access.elements))

    router.add(element, 0x60)
    if bulk:
        router.add_bulk(chunk, 0x60)
    buffer, memory = memory_of()
    buffer[0x200:0x205] = b"hello"
    async with FakePartition(router, memory=memory, max_elements=3) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx = 0x100, 3
        await vp.insb(0x60, rep=True)
        vp.rsi, vp.rcx = 0x200, 5
        await vp.outsb(0x60, rep=True)
    assert buffer[0x100:0x103] == (bytes([0x40, 0x41, 0x42]) if bulk else bytes([0x40, 0x40, 0x40]))
    assert bytes(received) == b"hello"


async def test_a_bulk_handler_that_raises_fails_the_chunk_with_all_ones() -> None:
    def broken(access: BulkAccess) -> bytes:
        raise OSError("disk gone")

    router = Router()
    router.add(lambda access: 0, 0x60)
    router.add_bulk(broken, 0x60)
    buffer, memory = memory_of()
    async with FakePartition(router, memory=memory, strict=False) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx = 0x10, 3
        completion = await vp.insb(0x60, rep=True)
    assert completion.status is Status.HANDLER_FAILED and buffer[0x10:0x13] == b"\xff" * 3
    assert partition.dispatcher.stats.handler_failed == 1


async def test_an_async_string_handler_past_the_deadline_completes_the_chunk() -> None:
    async def stuck(access: PortAccess) -> int:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    router = Router()
    router.add(stuck, 0x60)
    buffer, memory = memory_of()
    async with FakePartition(router, memory=memory, strict=False, deadline=0.05) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx, rip = 0x10, 3, vp.rip
        completion = await vp.insb(0x60, rep=True)
    assert completion.status is Status.DEADLINE_EXCEEDED
    assert buffer[0x10:0x13] == b"\xff" * 3 and (vp.rdi, vp.rcx, vp.rip) == (0x13, 0, rip + 2)


async def test_memory_taken_away_while_an_async_chunk_runs_is_a_memory_error() -> None:
    memory = BufferMemory([(0, bytearray(0x1000))])

    async def unplugging(access: PortAccess) -> int:
        memory.remove(0)  # what a VMM may not do with an intercept in flight, answered safely anyway
        await anyio.sleep(0)
        return 1

    router = Router()
    router.add(unplugging, 0x60)
    async with FakePartition(router, memory=memory, strict=False) as partition:
        vp = partition.vp(0)
        vp.rdi, rip = 0x10, vp.rip
        completion = await vp.insb(0x60)
    assert completion.status is Status.MEMORY_ERROR and completion.registers == Registers.NONE
    assert (vp.rdi, vp.rip) == (0x10, rip)
