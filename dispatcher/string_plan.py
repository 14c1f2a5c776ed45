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
from typing import NamedTuple

from .errors import AccessRefused
from .fields import SegmentRegister
from .guest import Guest, SegmentSource, Translate
from .guest_memory import GuestMemory, MemoryFault
from .wire import COUNTERS, ECHO, IDS, SEGMENT, STRING_FIELDS, Offset, Registers, Status, pack_completion
from .x86 import InstructionError, Segment, code_size, decode_io_instruction, ip_mask

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "StringPlan",
    "UnsupportedReason",
    "gather",
    "pack_elements",
    "plan_string",
    "refusal_completion",
    "scatter",
    "unpack_elements",
]

DEFAULT_MAX_ELEMENTS = 1024
PAGE_SIZE = 4096


class UnsupportedReason(enum.IntEnum):
    """The Detail of an UNSUPPORTED completion for a string access."""

    NO_GUEST_MEMORY = 1  # this connection has no guest memory (e.g. the pipe transport)
    SEGMENT_NOT_CARRIED = 2  # an SS/FS/GS override and no segment source knows it
    NEEDS_TRANSLATION = 3  # long mode (paging is on) and no translation hook


# By segment number: where the frame carries ES, CS and DS (the others it does not carry).
_SEGMENT_OFFSETS = (Offset.ES, Offset.CS, 0, Offset.DS, 0, 0)
_new = tuple.__new__
_MASK64 = (1 << 64) - 1
_DF, _VM, _AC = 1 << 10, 1 << 17, 1 << 18
# Registers flags as plain ints: combining IntFlag members costs microseconds.
_RIP, _RCX, _RSI, _RDI = int(Registers.RIP), int(Registers.RCX), int(Registers.RSI), int(Registers.RDI)


class StringPlan(NamedTuple):
    """What one string intercept does: ``elements`` elements of ``size`` bytes through ``port``.

    ``runs`` lists, in execution order, each stretch of elements that is
    contiguous in the offset space: its element count and the guest-physical
    pieces holding its bytes in ascending address order. With ``reverse``
    (RFLAGS.DF) the elements of a run go from its top down. The register
    fields are the values the completion sets, ``registers`` says which.
    """

    memory: GuestMemory
    partition: int
    vp_index: int
    port: int
    access_info: int
    is_write: bool
    size: int
    elements: int
    reverse: bool
    runs: list[tuple[int, list[tuple[int, int]]]]
    registers: int
    rip: int
    rax: int
    rcx: int
    rsi: int
    rdi: int

    def completion(self, status: Status = Status.COMPLETED, detail: int = 0) -> bytes:
        """The completion frame for this chunk, having moved all its elements."""
        return pack_completion(self.partition, self.vp_index, status, self.registers, self.rip, self.rax, self.rcx,
                               self.rsi, self.rdi, self.port, self.access_info, detail)  # fmt: skip


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
    runs = plan.runs
    if len(runs) == 1 and len(runs[0][1]) == 1 and not reverse:
        return read(*runs[0][1][0])
    parts = []
    for _, pieces in plan.runs:
        data = read(*pieces[0]) if len(pieces) == 1 else b"".join(read(a, n) for a, n in pieces)
        parts.append(_reverse_elements(data, size) if reverse else data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def scatter(plan: StringPlan, data: bytes) -> None:
    """Store an INS chunk's bytes, given in the order the elements came from the port."""
    write, size, reverse = plan.memory.write, plan.size, plan.reverse
    runs = plan.runs
    if len(runs) == 1 and len(runs[0][1]) == 1 and not reverse:
        write(runs[0][1][0][0], data)
        return
    position = 0
    for elements, pieces in plan.runs:
        end = position + elements * size
        part = data[position:end] if position or end != len(data) else data
        if reverse:
            part = _reverse_elements(part, size)
        offset = 0
        for address, n in pieces:
            write(address, part[offset : offset + n] if n != len(part) else part)
            offset += n
        position = end


class _Where(NamedTuple):
    # What the frame's bytes before RCX decide about a string intercept.
    partition: int
    vp: int
    port: int
    access_info: int
    rip: int
    next_rip: int
    rax: int
    is_write: bool
    size: int
    address_size: int
    rep: bool
    long_mode: bool
    paging_possible: bool
    reverse: bool
    base: int
    linear_mask: int
    limit_low: int
    limit_high: int
    align: int  # the element size when alignment is checked, else 0
    fault: AccessRefused | None  # an unusable or unknown segment, raised once the count is known not to be 0
    cacheable: bool  # False when the segment came from the segments hook


# Re-executions of a REP instruction repeat the same bytes before RCX: the
# analysis of those bytes is kept (a few hundred instructions at most).
_WHERE_CACHE: dict[bytes, _Where] = {}
_WHERE_CACHE_SIZE = 512


def plan_string(frame: bytes, guest: Guest | None, max_elements: int = DEFAULT_MAX_ELEMENTS) -> StringPlan:
    """Plan one string-op intercept (a frame the engine has already validated).

    Raises :class:`~dispatcher.AccessRefused` when no element can move:
    PROTOCOL_ERROR for instruction bytes that contradict the frame (Detail:
    the offset), UNSUPPORTED (Detail: :class:`UnsupportedReason`),
    MEMORY_ERROR when the first element faults (Detail:
    :class:`~dispatcher.MemoryFault`). Answer it with :func:`refusal_completion`.
    """
    key = frame[Offset.PARTITION : Offset.RCX]
    where = _WHERE_CACHE.get(key)
    if where is None:
        where = _analyse(frame, guest.segments if guest is not None else None)
        if where.cacheable:
            if len(_WHERE_CACHE) >= _WHERE_CACHE_SIZE:
                _WHERE_CACHE.clear()
            _WHERE_CACHE[key] = where
    (partition, vp, port, access_info, rip, next_rip, rax, is_write, size, address_size, rep, long_mode,
     paging_possible, reverse, base, linear_mask, limit_low, limit_high, align, fault, _) = where  # fmt: skip
    if guest is None:
        raise AccessRefused("no guest memory here", status=Status.UNSUPPORTED, detail=UnsupportedReason.NO_GUEST_MEMORY)
    memory, translate = guest.memory, guest.translate
    rcx, rsi, rdi = COUNTERS.unpack_from(frame, Offset.RCX)
    amask = (1 << address_size) - 1
    count = rcx & amask if rep else 1
    if count == 0:
        return _new(StringPlan, (memory, partition, vp, port, access_info, is_write, size, 0, False, [], _RIP,
                                 next_rip, rax, rcx, rsi, rdi))  # fmt: skip
    if long_mode and translate is None:
        raise AccessRefused(
            "long mode needs a translation hook", status=Status.UNSUPPORTED, detail=UnsupportedReason.NEEDS_TRANSLATION
        )
    if fault is not None:
        raise fault
    paged = translate if paging_possible else None

    index = rsi if is_write else rdi
    first = index & amask
    n = count if count < max_elements else max_elements
    span = n * size
    low = first - span + size if reverse else first
    runs: list[tuple[int, list[tuple[int, int]]]] = []
    # The common case at once: one stretch of offsets, inside the limits and
    # one backed range, no paging or alignment check.
    if paged is None and not align and limit_low <= low and low + span - size <= amask:
        linear = (base + low) & linear_mask
        fits = low + span - 1 <= limit_high and linear + span <= linear_mask + 1
        if fits and not memory.check(linear, span, write=not is_write):
            runs = [(n, [(linear, span)])]
    faulted = False
    if not runs:
        mapper = _Mapper(memory, not is_write, partition, vp, paged, base, linear_mask, limit_low, limit_high, align)
        try:
            runs = mapper.runs(first, n, size, reverse, amask)
        except AccessRefused:
            n = mapper.elements_before_fault(first, n, size, reverse, amask)
            runs = mapper.runs(first, n, size, reverse, amask)
            faulted = True  # not done: the re-executed instruction faults
    moved = (first - n * size if reverse else first + n * size) & amask
    index = (index & ~0xFFFF & _MASK64) | moved if address_size == 16 else moved
    if is_write:
        registers, rsi = _RSI, index
    else:
        registers, rdi = _RDI, index
    if rep:
        registers |= _RCX
        rcx = (rcx & ~0xFFFF & _MASK64) | (count - n) if address_size == 16 else count - n
    if n == count and not faulted:
        registers |= _RIP
        rip = next_rip
    return _new(StringPlan, (memory, partition, vp, port, access_info, is_write, size, n, reverse, runs, registers,
                             rip, rax, rcx, rsi, rdi))  # fmt: skip


def _analyse(frame: bytes, segments: SegmentSource | None) -> _Where:
    # Decode the instruction, check it against the frame, and find its segment.
    (partition, vp, length_cr8, access_type, state, cs_attributes, rip, rflags, port, access_info, byte_count, rax,
     instruction, _, _, _) = STRING_FIELDS.unpack_from(frame, Offset.PARTITION)  # fmt: skip
    bits = code_size(state, cs_attributes)
    if byte_count == 0:
        raise _protocol_error("a string I/O intercept needs its instruction bytes", Offset.INSTRUCTION_BYTE_COUNT)
    try:
        decoded = decode_io_instruction(instruction[:byte_count], bits)
    except InstructionError as error:
        raise _protocol_error(str(error), Offset.INSTRUCTION_BYTES + error.index) from None
    _, length, is_write, string, rep, size, address_size, _, _ = decoded
    if not string:
        raise _protocol_error("not INS or OUTS", Offset.INSTRUCTION_BYTES + length - 1)
    if is_write != (access_type == 1):
        raise _protocol_error("the access type contradicts the opcode", Offset.ACCESS_TYPE)
    if size != access_info & 7 or rep != bool(access_info & 0x10):
        raise _protocol_error("the access info contradicts the instruction bytes", Offset.ACCESS_INFO)
    if length != length_cr8 & 0xF:
        raise _protocol_error(f"the instruction length is not the {length} decoded", Offset.LENGTH_CR8)
    next_rip = (rip + length) & ip_mask(bits)
    segment = decoded.segment
    fault: AccessRefused | None = None
    frame_offset = _SEGMENT_OFFSETS[segment]
    cacheable = bool(frame_offset) or (bits == 64 and segment == Segment.SS)
    if frame_offset:
        base, limit, selector, attributes = SEGMENT.unpack_from(frame, frame_offset)
    elif cacheable:
        base = limit = selector = attributes = 0  # SS in 64-bit mode: flat, nothing about it matters
    else:
        register = segments(partition, vp, segment) if segments is not None else None
        if register is None:
            fault = AccessRefused(
                f"{segment.name} is not known", status=Status.UNSUPPORTED, detail=UnsupportedReason.SEGMENT_NOT_CARRIED
            )
            register = SegmentRegister()  # stands in until the fault is answered
        base, limit, selector, attributes = register
    v86 = state & 0x04 and rflags & _VM
    align = size if size > 1 and state & 0x08 and rflags & _AC and (v86 or state & 3 == 3) else 0
    if bits == 64:
        # No limit checks; CS/DS/ES/SS have base 0, FS/GS their own.
        base = base if segment >= Segment.FS else 0
        linear_mask, limit_low, limit_high = _MASK64, 0, 1 << 65
    else:
        base, linear_mask = base & 0xFFFF_FFFF, 0xFFFF_FFFF
        if fault is None and state & 0x04 and not v86 and _segment_unusable(segment, selector, attributes, is_write):
            fault = AccessRefused(
                "the segment cannot be used (#GP)", status=Status.MEMORY_ERROR, detail=MemoryFault.SEGMENT
            )
        if attributes & 0x1C == 0x14:  # a data segment that expands down
            limit_low, limit_high = limit + 1, 0xFFFF_FFFF if attributes & 0x4000 else 0xFFFF
        else:
            limit_low, limit_high = 0, limit
    return _Where(partition, vp, port, access_info, rip, next_rip, rax, is_write, size, address_size, rep,
                  bool(state & 0x10), bool(state & 0x04), bool(rflags & _DF), base, linear_mask, limit_low,
                  limit_high, align, fault, cacheable)  # fmt: skip


def _protocol_error(reason: str, offset: int) -> AccessRefused:
    return AccessRefused(reason, status=Status.PROTOCOL_ERROR, detail=offset)


def _memory_fault(fault: MemoryFault, offset: int) -> AccessRefused:
    return AccessRefused(f"{fault.name} at offset {offset:#x}", status=Status.MEMORY_ERROR, detail=fault)


def refusal_completion(frame: bytes, refused: AccessRefused) -> bytes:
    """The completion of a refused string intercept: the registers as they were, nothing moved."""
    partition, vp = IDS.unpack_from(frame, Offset.PARTITION)
    rip, port, access_info, rax = ECHO.unpack_from(frame, Offset.RIP)
    rcx, rsi, rdi = COUNTERS.unpack_from(frame, Offset.RCX)
    return pack_completion(partition, vp, refused.status, Registers.NONE, rip, rax, rcx, rsi, rdi, port, access_info,
                           refused.detail)  # fmt: skip


def _segment_unusable(segment: int, selector: int, attributes: int, is_write: bool) -> bool:
    # Protected mode: a null or not-present segment, a system segment, or one
    # whose type forbids the access (INS writes ES; OUTS reads) is #GP(0).
    if segment != Segment.CS and not selector & 0xFFFC:
        return True
    if attributes & 0x90 != 0x90:  # P and S
        return True
    code_segment, flag = attributes & 0x8, attributes & 0x2
    if is_write:  # OUTS reads memory: data segments, or code segments marked readable
        return bool(code_segment and not flag)
    return bool(code_segment or not flag)  # INS writes memory: writable data segments only


class _Mapper:
    """Maps segment offsets to guest-physical pieces, checking each the way the CPU would."""

    __slots__ = ("align", "base", "limit_high", "limit_low", "linear_mask", "memory", "paged", "partition", "vp",
                 "write")  # fmt: skip

    def __init__(self, memory: GuestMemory, write: bool, partition: int, vp: int, paged: Translate | None, base: int,
                 linear_mask: int, limit_low: int, limit_high: int, align: int) -> None:  # fmt: skip
        self.memory, self.write, self.partition, self.vp, self.paged = memory, write, partition, vp, paged
        self.base, self.linear_mask, self.limit_low, self.limit_high, self.align = (base, linear_mask, limit_low,
                                                                                    limit_high, align)  # fmt: skip

    def pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The guest-physical pieces of bytes [offset, offset+length) of the segment.

        Raises :class:`~dispatcher.AccessRefused` (MEMORY_ERROR) for the first fault.
        """
        if offset < self.limit_low or offset + length - 1 > self.limit_high:
            raise _memory_fault(MemoryFault.SEGMENT, offset)
        linear_mask = self.linear_mask
        linear = (self.base + offset) & linear_mask
        if self.align and linear % self.align:
            raise _memory_fault(MemoryFault.ALIGNMENT, offset)
        pieces: list[tuple[int, int]] = []
        while length:
            n = min(length, linear_mask + 1 - linear)  # the linear address space wraps
            if self.paged is None:
                pieces.append((linear, n))
            else:
                at, stop = linear, linear + n
                while at < stop:
                    step = min(stop - at, PAGE_SIZE - (at & (PAGE_SIZE - 1)))
                    physical = self.paged(self.partition, self.vp, at, self.write)
                    if physical is None:
                        raise _memory_fault(MemoryFault.TRANSLATION, offset)
                    if pieces and pieces[-1][0] + pieces[-1][1] == physical:
                        pieces[-1] = (pieces[-1][0], pieces[-1][1] + step)
                    else:
                        pieces.append((physical, step))
                    at += step
            linear, length = 0, length - n
        for address, n in pieces:
            fault = self.memory.check(address, n, write=self.write)
            if fault:
                raise _memory_fault(MemoryFault(fault), offset)
        return pieces

    def runs(self, first: int, n: int, size: int, reverse: bool, amask: int) -> list[tuple[int, list[tuple[int, int]]]]:
        """Split n elements from offset ``first`` where the offset wraps, and map each stretch."""
        runs: list[tuple[int, list[tuple[int, int]]]] = []
        offset = first
        while n:
            k = min(n, offset // size + 1 if reverse else (amask - offset) // size + 1)
            runs.append((k, self.pieces(offset - (k - 1) * size if reverse else offset, k * size)))
            offset = (offset - k * size if reverse else offset + k * size) & amask
            n -= k
        return runs

    def elements_before_fault(self, first: int, n: int, size: int, reverse: bool, amask: int) -> int:
        """How many of n elements, in execution order, come before the first that faults.

        Raises the first element's fault if it is that one.
        """
        step = -size if reverse else size
        for i in range(n):
            try:
                self.pieces((first + i * step) & amask, size)
            except AccessRefused:
                if not i:
                    raise
                return i
        return n
