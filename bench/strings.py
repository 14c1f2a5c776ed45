"""String I/O throughput: 64 KiB by REP OUTSB and REP INSW through the sans-I/O core, in MB/s.

Each instruction runs as a VMM runs it: one intercept per chunk of at most
1024 elements (the default), the completion's RCX/RSI/RDI written back and
the instruction re-executed until RIP moves. The devices are a debug console
(OUTSB appends bytes) and a disk's PIO data port (INSW reads a 512-byte
sector buffer while DRQ is set and loads the next sector when it empties, as
an ATA device does), each once with only its element handler and once with a
bulk handler too. The baseline is a plain memoryview copy of the same 64 KiB,
measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from dispatcher import (
    DEFAULT_MAX_ELEMENTS,
    AccessInfo,
    AccessType,
    BufferMemory,
    BulkAccess,
    Engine,
    ExecutionState,
    Guest,
    IoPortInterceptMessage,
    PortAccess,
    Registers,
    Router,
    SegmentAttributes,
    SegmentRegister,
)
from dispatcher.wire import COUNTERS, REGISTER_FLAGS, Offset

SIZE = 64 * 1024
CONSOLE, DISK = 0x402, 0x1F0
SOURCE, TARGET = 0x1_0000, 0x2_0000


def _intercept(port: int, size: int, write: bool) -> bytearray:
    # REP OUTSB / REP INSW in 32-bit protected mode with flat segments.
    code = bytes([0xF3, 0x6E]) if write else bytes([0x66, 0xF3, 0x6D])
    flat = SegmentRegister(0, 0xFFFF_FFFF, 0x10, SegmentAttributes(0xC093))
    message = IoPortInterceptMessage(
        port_number=port,
        access_type=AccessType.WRITE if write else AccessType.READ,
        access_info=AccessInfo.build(size, string_op=True, rep_prefix=True),
        instruction_length=len(code),
        instruction_bytes=code,
        execution_state=ExecutionState.build(cr0_pe=True),
        cs_segment=SegmentRegister(0, 0xFFFF_FFFF, 0x8, SegmentAttributes(0xC09B)),
        rip=0x1000,
        ds_segment=flat,
        es_segment=flat,
    )
    return bytearray(message.to_bytes())


def _execute(engine: Engine, frame: bytearray, elements: int, write: bool) -> int:
    """Run one REP instruction over ``elements`` elements to the end; return the exits it took."""
    rcx, rsi, rdi = elements, SOURCE, TARGET
    exits = 0
    while True:
        COUNTERS.pack_into(frame, Offset.RCX, rcx, rsi, rdi)
        out, _ = engine.receive([bytes(frame)])
        exits += 1
        completion = out[0]
        rcx, rsi, rdi = COUNTERS.unpack_from(completion, Offset.COMPLETION_RCX)
        if REGISTER_FLAGS.unpack_from(completion, Offset.COMPLETION_REGISTERS)[0] & Registers.RIP:
            return exits


def _console(bulk: bool) -> tuple[Router, bytearray]:
    router, received = Router(), bytearray()

    def put(access: PortAccess) -> None:
        received.append(access.value)

    def put_chunk(access: BulkAccess) -> None:
        received.extend(access.data)

    router.add(put, CONSOLE, access="w")
    if bulk:
        router.add_bulk(put_chunk, CONSOLE, access="w")
    return router, received


class _Disk:
    """A PIO data port over a disk image: a sector buffer the media fills, DRQ while it holds data."""

    SECTOR = 512

    def __init__(self, image: bytes) -> None:
        self.image = image
        self.buffer = bytearray(self.SECTOR)
        self.words = memoryview(self.buffer).cast("H")
        self.rewind()

    def rewind(self) -> None:
        self.lba = 0
        self.load()

    def load(self) -> None:
        start = self.lba * self.SECTOR
        self.drq = start < len(self.image)
        if self.drq:
            self.buffer[:] = self.image[start : start + self.SECTOR]
        self.position = 0  # in words

    def read_word(self, access: PortAccess) -> int:
        if not self.drq:
            return 0xFFFF
        value = self.words[self.position]
        self.position += 1
        if self.position == self.SECTOR // 2:
            self.lba += 1
            self.load()
        return value

    def read_words(self, access: BulkAccess) -> bytes:
        wanted, parts = access.elements * 2, list[bytes | bytearray]()
        while wanted and self.drq:
            start = self.position * 2
            take = min(wanted, self.SECTOR - start)
            parts.append(self.buffer[start : start + take])
            self.position += take // 2
            wanted -= take
            if self.position == self.SECTOR // 2:
                self.lba += 1
                self.load()
        if wanted:
            parts.append(b"\xff" * wanted)
        return b"".join(parts)


def _disk(bulk: bool, image: bytes) -> tuple[Router, Callable[[], None]]:
    router, disk = Router(), _Disk(image)
    router.add(disk.read_word, DISK, 2, access="r")
    if bulk:
        router.add_bulk(disk.read_words, DISK, access="r")
    return router, disk.rewind


def _seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _rate(work: Callable[[], object], seconds: float) -> float:
    """Median MB/s over repeated runs of ``work`` (each moves SIZE bytes); the median skips machine stalls."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        times.append(_seconds(work))
    return SIZE / statistics.median(times) / 1e6


def _pair(bulk: Callable[[], object], element: Callable[[], object], seconds: float) -> tuple[float, float, float]:
    """Median MB/s of each and the median ratio of runs taken back to back, so load drift on a shared
    machine moves both sides of a ratio alike."""
    ratios: list[float] = []
    bulk_times: list[float] = []
    element_times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(ratios) < 5:
        bulk_time = statistics.median(_seconds(bulk) for _ in range(5))
        element_time = _seconds(element)
        ratios.append(element_time / bulk_time)
        bulk_times.append(bulk_time)
        element_times.append(element_time)
    return SIZE / statistics.median(bulk_times) / 1e6, SIZE / statistics.median(element_times) / 1e6, \
        statistics.median(ratios)  # fmt: skip


def _outsb(bulk: bool, memory: BufferMemory, image: bytes) -> Callable[[], None]:
    router, received = _console(bulk)
    engine = Engine(router, guest=Guest(memory), deadline=None)
    frame = _intercept(CONSOLE, 1, True)

    def outsb() -> None:
        received.clear()
        _execute(engine, frame, SIZE, True)

    outsb()
    if received != image:
        raise AssertionError("OUTSB moved the wrong bytes")
    return outsb


def _insw(bulk: bool, memory: BufferMemory, buffer: bytearray, image: bytes) -> Callable[[], None]:
    router, rewind = _disk(bulk, image)
    engine = Engine(router, guest=Guest(memory), deadline=None)
    frame = _intercept(DISK, 2, False)

    def insw() -> None:
        rewind()
        _execute(engine, frame, SIZE // 2, False)

    buffer[TARGET : TARGET + SIZE] = bytes(SIZE)
    insw()
    if buffer[TARGET : TARGET + SIZE] != image:
        raise AssertionError("INSW stored the wrong bytes")
    return insw


def run(quick: bool) -> dict[str, float]:
    seconds = 2.0 if quick else 6.0
    image = bytes((i * 31 + 7) & 0xFF for i in range(SIZE))
    buffer = bytearray(0x4_0000)
    buffer[SOURCE : SOURCE + SIZE] = image
    memory = BufferMemory([(0, buffer)])
    figures: dict[str, float] = {}
    for name in ("outsb", "insw"):
        if name == "outsb":
            chunks, elements = _outsb(True, memory, image), _outsb(False, memory, image)
        else:
            chunks, elements = _insw(True, memory, buffer, image), _insw(False, memory, buffer, image)
        bulk, element, ratio = _pair(chunks, elements, seconds)
        figures.update({f"rep_{name}_bulk_mb_s": bulk, f"rep_{name}_element_mb_s": element,
                        f"rep_{name}_bulk_ratio": ratio})  # fmt: skip
    source, target = memoryview(image), memoryview(bytearray(SIZE))

    def copy() -> None:
        target[:] = source

    figures["memcopy_mb_s"] = _rate(copy, seconds / 4)
    exits = (SIZE + DEFAULT_MAX_ELEMENTS - 1) // DEFAULT_MAX_ELEMENTS
    print(f"64 KiB, at most {DEFAULT_MAX_ELEMENTS} elements per exit ({exits} exits for OUTSB, {exits // 2} for INSW)")
    for name in ("outsb", "insw"):
        chunked, element, ratio = (
            figures[f"rep_{name}_{kind}"] for kind in ("bulk_mb_s", "element_mb_s", "bulk_ratio")
        )
        print(f"rep {name:<5}  bulk {chunked:>8.1f} MB/s   element {element:>6.2f} MB/s   ratio {ratio:>6.1f}")
    print(f"memoryview copy {figures['memcopy_mb_s']:>10.0f} MB/s")
    return figures
