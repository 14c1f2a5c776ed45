"""String I/O (INS/OUTS, optionally REP): which guest bytes one intercept moves.

:func:`plan_string` reads a string-op intercept frame and decides, without
calling any handler, what this exit does: the element size and count (at
most ``max_elements``), where in guest-physical memory the elements live,
and the registers the completion will set. The engine then runs the handlers
and moves the bytes with :func:`gather` / :func:`scatter`.

Addresses, as the architecture computes them: the offset register (rSI for
OUTS, rDI for INS) and the counter rCX are masked to the address size; the
linear address is segment base + offset (64-bit mode: base 0 except FS/GS;
elsewhere wrapped to 32 bits); segment limits, types and alignment checks
apply as in the SDM; the linear address becomes guest-physical through the
translation hook when the guest may page (CR0.PE set and a hook given, or
EFER.LMA set, which requires one), else it is the physical address.

A chunk that would reach a faulting element stops before it: the elements
before it complete (RIP not advanced), and the re-executed instruction then
faults at once with MEMORY_ERROR, touching nothing.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from .completion import COMPLETION, COMPLETION_SIZE, COMPLETION_STRUCT, PROTOCOL_VERSION, Registers, Status
from .errors import FieldValueError
from .fields import SegmentRegister
from .guest_memory import GuestMemory, MemoryFault
from .message import HEADER_SIZE
from .string_decode import Segment, code_size, decode_string_instruction

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "Refusal",
    "SegmentSource",
    "StringPlan",
    "Translate",
    "UnsupportedReason",
    "gather",
    "identity_translation",
    "pack_elements",
    "plan_string",
    "scatter",
    "unpack_elements",
]

DEFAULT_MAX_ELEMENTS = 1024
PAGE_SIZE = 4096

Translate = Callable[[int, int, int, bool], "int | None"]
"""``translate(partition, vp_index, linear, write)``: the guest-physical address of the
byte at ``linear``, valid to the end of its 4 KiB page, or None if the guest's page
tables do not allow the access (the VMM raises the #PF)."""

SegmentSource = Callable[[int, int, Segment], "SegmentRegister | None"]
"""``segments(partition, vp_index, segment)``: the current SS, FS or GS of a VP (which the
intercept does not carry), or None if unknown."""


class UnsupportedReason(enum.IntEnum):
    """The Detail of an UNSUPPORTED completion for a string access."""

    NO_GUEST_MEMORY = 1  # this connection has no guest memory (e.g. the pipe transport)
    SEGMENT_NOT_CARRIED = 2  # an SS/FS/GS override and no segment source knows it
    NEEDS_TRANSLATION = 3  # long mode (paging is on) and no translation hook


def identity_translation(partition: int, vp_index: int, linear: int, write: bool) -> int:
    """The translation hook of a guest whose page tables map every address to itself."""
    return linear


# The intercept's fields by offset: VP and state at 8, CS attributes to the
# instruction bytes at 38, a segment register at 24 (CS), 88 (DS) or 104
# (ES), and RCX, RSI, RDI at 120.
_HEAD = struct.Struct("<QIBBH")
_BODY = struct.Struct("<HQQHBB4xQ16s")
_SEGMENT = struct.Struct("<QIHH")
_COUNTERS = struct.Struct("<QQQ")
_SEGMENT_OFFSETS = {Segment.ES: 104, Segment.CS: 24, Segment.DS: 88}
_PAYLOAD = COMPLETION_SIZE - HEADER_SIZE
_pack = COMPLETION_STRUCT.pack
_MASK64 = (1 << 64) - 1
_DF, _VM, _AC = 1 << 10, 1 << 17, 1 << 18


class Refusal(NamedTuple):
    """A string intercept answered without running any handler: why, and the completion frame."""

    status: Status
    detail: int
    reason: str
    partition: int
    vp_index: int
    port: int
    completion: bytes


@dataclass(slots=True, eq=False)
class StringPlan:
    """What one string intercept does: ``count`` elements of ``size`` bytes through ``port``.

    ``runs`` lists, in execution order, each stretch of elements that is
    contiguous in the offset space: its element count and the guest-physical
    pieces holding its bytes in ascending address order. With ``reverse``
    (RFLAGS.DF) the elements of a run go from its top down.
    """

    memory: GuestMemory
    partition: int
    vp_index: int
    port: int
    access_info: int
    is_write: bool
    size: int
    count: int
    reverse: bool
    runs: list[tuple[int, list[tuple[int, int]]]]
    registers: int
    rip: int
    rax: int
    rcx: int
    rsi: int
    rdi: int

    @property
    def done(self) -> bool:
        """True if this chunk finishes the instruction (the completion advances RIP)."""
        return bool(self.registers & Registers.RIP)

    def completion(self, status: Status = Status.COMPLETED, detail: int = 0) -> bytes:
        """The completion frame for this chunk, having moved all ``count`` elements."""
        return _pack(COMPLETION, _PAYLOAD, 0, 0, 0, self.partition, self.vp_index, PROTOCOL_VERSION, status,
                     self.registers, self.rip, self.rax, self.rcx, self.rsi, self.rdi, self.port, self.access_info,
                     0, detail)  # fmt: skip


def _reverse_elements(data: bytes, size: int) -> bytes:
    if size == 1:
        return data[::-1]
    return memoryview(data).cast("H" if size == 2 else "I")[::-1].tobytes()


_FORMATS = ("", "B", "H", "", "I")


def pack_elements(values: list[object], size: int) -> bytes:
    """Values read from a port, as the little-endian bytes of ``size``-byte elements."""
    mask = (1 << 8 * size) - 1
    try:
        return struct.pack(f"<{len(values)}{_FORMATS[size]}", *[v & mask for v in values])  # type: ignore[operator]
    except TypeError:
        bad = next(v for v in values if not isinstance(v, int))
        raise TypeError(f"a read handler returned {bad!r}, not an int") from None


def unpack_elements(data: bytes, size: int) -> tuple[int, ...]:
    """The values of the little-endian ``size``-byte elements in ``data``."""
    return struct.unpack(f"<{len(data) // size}{_FORMATS[size]}", data)


def gather(plan: StringPlan) -> bytes:
    """The bytes an OUTS chunk sends, in the order the elements go to the port."""
    read, size, reverse = plan.memory.read, plan.size, plan.reverse
    parts = []
    for _, pieces in plan.runs:
        data = read(*pieces[0]) if len(pieces) == 1 else b"".join(read(a, n) for a, n in pieces)
        parts.append(_reverse_elements(data, size) if reverse else data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def scatter(plan: StringPlan, data: bytes) -> None:
    """Store an INS chunk's bytes, given in the order the elements came from the port."""
    write, size, reverse = plan.memory.write, plan.size, plan.reverse
    position = 0
    for count, pieces in plan.runs:
        end = position + count * size
        part = data[position:end] if position or end != len(data) else data
        if reverse:
            part = _reverse_elements(part, size)
        offset = 0
        for address, n in pieces:
            write(address, part[offset : offset + n] if n != len(part) else part)
            offset += n
        position = end


def plan_string(
    frame: bytes,
    memory: GuestMemory | None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    translate: Translate | None = None,
    segments: SegmentSource | None = None,
) -> StringPlan | Refusal:
    """Plan one string-op intercept (a frame the engine has already validated).

    Returns a :class:`Refusal` when no element can move: PROTOCOL_ERROR for
    instruction bytes that contradict the frame (Detail: the offset),
    UNSUPPORTED (Detail: :class:`UnsupportedReason`), MEMORY_ERROR when the
    first element faults (Detail: :class:`~dispatcher.MemoryFault`).
    """
    partition, vp, length_cr8, access_type, state = _HEAD.unpack_from(frame, 8)
    cs_attributes, rip, rflags, port, access_info, byte_count, rax, instruction = _BODY.unpack_from(frame, 38)
    rcx, rsi, rdi = _COUNTERS.unpack_from(frame, 120)

    def refuse(status: Status, detail: int, reason: str) -> Refusal:
        completion = _pack(COMPLETION, _PAYLOAD, 0, 0, 0, partition, vp, PROTOCOL_VERSION, status, 0, rip, rax, rcx,
                           rsi, rdi, port, access_info, 0, detail)  # fmt: skip
        return Refusal(status, detail, reason, partition, vp, port, completion)

    code = code_size(state, cs_attributes)
    try:
        ins = decode_string_instruction(instruction, byte_count, code)
    except FieldValueError as error:
        return refuse(Status.PROTOCOL_ERROR, error.offset, str(error))
    if ins.is_write != (access_type == 1):
        return refuse(Status.PROTOCOL_ERROR, 21, f"access type {access_type} contradicts opcode {ins.opcode:#x}")
    if ins.element_size != access_info & 7 or ins.rep != bool(access_info & 0x10):
        return refuse(Status.PROTOCOL_ERROR, 58, f"access info {access_info:#x} contradicts the instruction bytes")
    if ins.length != length_cr8 & 0xF:
        return refuse(Status.PROTOCOL_ERROR, 20, f"instruction length {length_cr8 & 0xF}, decoded {ins.length}")
    if memory is None:
        return refuse(Status.UNSUPPORTED, UnsupportedReason.NO_GUEST_MEMORY, "no guest memory on this connection")
    address_size, size, is_write = ins.address_size, ins.element_size, ins.is_write
    amask = (1 << address_size) - 1
    count = rcx & amask if ins.rep else 1
    rip_mask = 0xFFFF if code == 16 else 0xFFFF_FFFF if code == 32 else _MASK64
    next_rip = (rip + ins.length) & rip_mask
    if count == 0:
        return StringPlan(memory, partition, vp, port, access_info, is_write, size, 0, False, [], Registers.RIP,
                          next_rip, rax, rcx, rsi, rdi)  # fmt: skip

    # Where the elements live: the segment, its checks, and how linear becomes physical.
    segment = ins.segment
    if segment in _SEGMENT_OFFSETS:
        base, limit, selector, attributes = _SEGMENT.unpack_from(frame, _SEGMENT_OFFSETS[segment])
    elif code == 64 and segment is Segment.SS:
        base = limit = selector = attributes = 0  # flat: nothing about SS matters
    else:
        register = segments(partition, vp, segment) if segments is not None else None
        if register is None:
            return refuse(Status.UNSUPPORTED, UnsupportedReason.SEGMENT_NOT_CARRIED, f"{segment.name} is not known")
        base, limit, selector, attributes = register
    if state & 0x10 and translate is None:
        return refuse(Status.UNSUPPORTED, UnsupportedReason.NEEDS_TRANSLATION, "long mode needs a translation hook")
    paged = translate if state & 0x04 else None
    v86 = bool(state & 0x04 and rflags & _VM)
    cpl = 3 if v86 else state & 3
    align_check = size > 1 and bool(state & 0x08) and bool(rflags & _AC) and cpl == 3
    memory_write = not is_write

    if code == 64:
        # No limit checks; CS/DS/ES/SS have base 0, FS/GS their own.
        base = base if segment >= Segment.FS else 0
        linear_mask, limit_low, limit_high = _MASK64, 0, 1 << 65
    else:
        base, linear_mask = base & 0xFFFF_FFFF, 0xFFFF_FFFF
        if state & 0x04 and not v86 and _segment_unusable(segment, selector, attributes, is_write):
            return refuse(Status.MEMORY_ERROR, MemoryFault.SEGMENT, f"{segment.name} cannot be used (#GP)")
        if attributes & 0x1C == 0x14:  # a data segment that expands down
            limit_low, limit_high = limit + 1, 0xFFFF_FFFF if attributes & 0x4000 else 0xFFFF
        else:
            limit_low, limit_high = 0, limit

    def pieces_of(offset: int, length: int) -> list[tuple[int, int]] | int:
        # The guest-physical pieces of the bytes [offset, offset+length) of the
        # segment, or the MemoryFault of the first check they fail.
        if offset < limit_low or offset + length - 1 > limit_high:
            return MemoryFault.SEGMENT
        linear = (base + offset) & linear_mask
        if align_check and linear % size:
            return MemoryFault.ALIGNMENT
        pieces: list[tuple[int, int]] = []
        while length:
            n = min(length, linear_mask + 1 - linear)
            if paged is None:
                pieces.append((linear, n))
            else:
                stop, at = linear + n, linear
                while at < stop:
                    step = min(stop - at, PAGE_SIZE - (at & (PAGE_SIZE - 1)))
                    physical = paged(partition, vp, at, memory_write)
                    if physical is None:
                        return MemoryFault.TRANSLATION
                    if pieces and pieces[-1][0] + pieces[-1][1] == physical:
                        pieces[-1] = (pieces[-1][0], pieces[-1][1] + step)
                    else:
                        pieces.append((physical, step))
                    at += step
            linear, length = 0, length - n
        for address, n in pieces:
            fault = memory.check(address, n, write=memory_write)
            if fault:
                return fault
        return pieces

    index = rsi if is_write else rdi
    first = index & amask
    reverse = bool(rflags & _DF)
    step = -size if reverse else size
    n = min(count, max_elements)
    runs = _runs(first, n, size, reverse, amask, pieces_of)
    faulted = isinstance(runs, int)
    if isinstance(runs, int):
        # Some element faults: stop before the first, in execution order.
        fault = runs
        for i in range(n):
            found = pieces_of((first + i * step) & amask, size)
            if isinstance(found, int):
                n, fault = i, found
                break
        runs = _runs(first, n, size, reverse, amask, pieces_of) if n else fault
        if isinstance(runs, int):
            return refuse(Status.MEMORY_ERROR, runs, f"{MemoryFault(runs).name} at offset {first:#x}")
    moved = (first + n * step) & amask
    index = (index & ~0xFFFF & _MASK64) | moved if address_size == 16 else moved
    registers = Registers.RSI if is_write else Registers.RDI
    if ins.rep:
        registers |= Registers.RCX
        rcx = (rcx & ~0xFFFF & _MASK64) | (count - n) if address_size == 16 else count - n
    if n == count and not faulted:
        registers |= Registers.RIP
        rip = next_rip
    rsi, rdi = (index, rdi) if is_write else (rsi, index)
    return StringPlan(memory, partition, vp, port, access_info, is_write, size, n, reverse, runs, registers, rip,
                      rax, rcx, rsi, rdi)  # fmt: skip


def _segment_unusable(segment: Segment, selector: int, attributes: int, is_write: bool) -> bool:
    # Protected mode: a null or not-present segment, a system segment, or one
    # whose type forbids the access (INS writes ES; OUTS reads) is #GP(0).
    if segment is not Segment.CS and not selector & 0xFFFC:
        return True
    if attributes & 0x90 != 0x90:  # P and S
        return True
    code_segment, flag = attributes & 0x8, attributes & 0x2
    if is_write:  # OUTS reads memory: data segments, or code segments marked readable
        return bool(code_segment and not flag)
    return bool(code_segment or not flag)  # INS writes memory: writable data segments only


def _runs(
    first: int,
    n: int,
    size: int,
    reverse: bool,
    amask: int,
    pieces_of: Callable[[int, int], list[tuple[int, int]] | int],
) -> list[tuple[int, list[tuple[int, int]]]] | int:
    # Split n elements from offset `first` where the offset wraps at the
    # address size, and map each stretch; an int is the first fault found.
    runs: list[tuple[int, list[tuple[int, int]]]] = []
    offset = first
    while n:
        k = min(n, offset // size + 1 if reverse else (amask - offset) // size + 1)
        low = offset - (k - 1) * size if reverse else offset
        pieces = pieces_of(low, k * size)
        if isinstance(pieces, int):
            return pieces
        runs.append((k, pieces))
        offset = (offset - k * size if reverse else offset + k * size) & amask
        n -= k
    return runs
