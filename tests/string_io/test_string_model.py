"""The engine's string I/O against an independent reference model (tests/string_io/string_model.py)."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from string_driver import Vp, run
from string_model import Machine, execute

from dispatcher import (
    BufferMemory,
    BulkAccess,
    Engine,
    Guest,
    PortAccess,
    Router,
    SegmentAttributes,
    SegmentRegister,
    Status,
    identity_translation,
)

PORT = 0x1F0
MEMORY_SIZE = 0x28000  # two adjacent regions: [0, 0x20000) and [0x20000, 0x28000)


@dataclass
class Scenario:
    mode: str
    outs: bool
    size: int
    rep: bool
    address_size: int
    segment: str | None
    df: bool
    rcx: int
    index: int
    segments: dict[str, tuple[int, int]]
    max_elements: int
    bulk: bool
    fill: int


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    mode = draw(st.sampled_from(["real", "protected", "long"]))
    outs = draw(st.booleans())
    address_size = draw(st.sampled_from([32, 64] if mode == "long" else [16, 32]))
    mask = (1 << address_size) - 1
    count = draw(st.integers(0, 40))
    upper = draw(st.sampled_from([0, 0xFFFF_FFFF_0000_0000, 0x1234_5678_9ABC_0000]))
    index = draw(
        st.one_of(
            st.integers(0, 0x40),
            st.integers(0xFFC0, 0x1_0040),
            st.integers(0x1_FFC0, 0x2_0040),
            st.integers(MEMORY_SIZE - 0x40, MEMORY_SIZE + 0x40),
            st.integers(mask - 0x40, mask),
        )
    )
    segments = {}
    for name in ("cs", "ds", "es"):
        if mode == "real":
            base = draw(st.integers(0, 0x1800)) * 16
            limit = draw(st.sampled_from([0xFFFF, 0xFFFF_FFFF]))  # unreal mode keeps a 4 GiB limit
        else:
            base = draw(st.sampled_from([0, 0x1_0000, 0x2_7F00, 0xFFFF_FF00]))
            limit = draw(st.sampled_from([0xFFFF_FFFF, 0x1_FFFF, 0xFFFF]))
        segments[name] = (base, limit)
    return Scenario(
        mode=mode,
        outs=outs,
        size=draw(st.sampled_from([1, 2, 4])),
        rep=draw(st.booleans()),
        address_size=address_size,
        segment=draw(st.none() | st.sampled_from(["es", "cs", "ds"])) if outs else None,
        df=draw(st.booleans()),
        rcx=(upper & ~mask | count) & (1 << 64) - 1,
        index=(upper | index) & (1 << 64) - 1,
        segments=segments,
        max_elements=draw(st.integers(1, 9)),
        bulk=draw(st.booleans()),
        fill=draw(st.integers(0, 255)),
    )


class Device:
    """A data port whose reads count up; every element read or written is logged."""

    def __init__(self) -> None:
        self.next_value = 0x1357_9BDF
        self.log: list[tuple[bool, int]] = []

    def read(self) -> int:
        self.next_value = (self.next_value * 69069 + 1) & 0xFFFF_FFFF
        return self.next_value

    def read_element(self, size: int) -> int:
        value = self.read() & (1 << 8 * size) - 1
        self.log.append((False, value))
        return value

    def element(self, access: PortAccess) -> int | None:
        if access.is_write:
            self.log.append((True, access.value))
            return None
        return self.read_element(access.size)

    def chunk(self, access: BulkAccess) -> bytes | None:
        size = access.size
        if access.is_write:
            for i in range(access.elements):
                self.log.append((True, int.from_bytes(access.data[i * size : (i + 1) * size], "little")))
            return None
        return b"".join(self.read_element(size).to_bytes(size, "little") for _ in range(access.elements))


def initial_memory(fill: int) -> bytearray:
    pattern = bytes((i * 7 + fill) & 0xFF for i in range(256))
    return bytearray(pattern * (MEMORY_SIZE // 256))


def segment_register(mode: str, base: int, limit: int, code: bool) -> SegmentRegister:
    attributes = {("real", True): 0x9B, ("real", False): 0x93, ("protected", True): 0xC09B,
                  ("long", True): 0xA09B}.get((mode, code), 0xC093)  # fmt: skip
    return SegmentRegister(base, limit, 0x8 if code else 0x10, SegmentAttributes(attributes))


@settings(max_examples=200)
@given(scenarios())
def test_string_instructions_match_the_reference_model(s: Scenario) -> None:
    # The model: one element at a time, no chunks.
    model_device = Device()
    machine = Machine(s.mode, s.rcx, s.index, s.index, s.df, s.segments, initial_memory(s.fill))
    execute(machine, outs=s.outs, size=s.size, rep=s.rep, address_size=s.address_size, segment=s.segment,
            device_read=model_device.read)  # fmt: skip

    # The engine: chunks of at most max_elements, re-executed until done.
    device = Device()
    router = Router()
    router.add(device.element, PORT, 4)
    if s.bulk:
        router.add_bulk(device.chunk, PORT)
    buffer = initial_memory(s.fill)
    view = memoryview(buffer)
    memory = BufferMemory([(0, view[:0x2_0000]), (0x2_0000, view[0x2_0000:])])
    engine = Engine(router, guest=Guest(memory, identity_translation), max_elements=s.max_elements, deadline=None)
    vp = Vp(s.mode, rcx=s.rcx, rsi=s.index, rdi=s.index, rflags=0x2 | s.df << 10,
            cs=segment_register(s.mode, *s.segments["cs"], code=True),
            ds=segment_register(s.mode, *s.segments["ds"], code=False),
            es=segment_register(s.mode, *s.segments["es"], code=False))  # fmt: skip
    last = run(engine, vp, PORT, outs=s.outs, size=s.size, rep=s.rep, address_size=s.address_size, segment=s.segment)

    assert device.log == machine.log
    assert buffer == machine.memory
    assert (vp.rcx, vp.rsi, vp.rdi) == (machine.rcx, machine.rsi, machine.rdi)
    assert (vp.rip != 0x1000) == machine.rip_advanced
    assert last.status is (Status.MEMORY_ERROR if machine.faulted else Status.COMPLETED)
    # Bounded work: no exit moved more than max_elements elements.
    mask = (1 << s.address_size) - 1
    for before, completion in vp.history:
        assert (before - completion.rcx) & mask <= s.max_elements or not s.rep
