"""KVM port I/O exits as I/O port intercept messages, and completions back as KVM state.

:class:`FrameBuilder` turns what a vCPU thread captured at a
``KVM_EXIT_IO`` (:class:`IoCapture`) into the intercept frame the seed
describes, and a :class:`PendingIo` recording the registers at the
intercept and the registers KVM itself will produce when it finishes the
instruction. :func:`plan_completion` compares the completion with that: when
they agree (the common case) the vCPU just re-enters the guest with the right
bytes in the I/O data page; otherwise it has KVM finish the instruction
without running the guest and then sets exactly the registers the completion
names (the others back to their values at the intercept).

What KVM reports, measured on this host (docs/KVM.md): IN, INS and REP INS
exit with RIP at the instruction; OUT and non-REP OUTS exit with RIP already
past it on kvm-pvm (``out_rip_advanced``; at the instruction on VMX/SVM
hardware), so the instruction is found by decoding backwards; REP OUTS exits
once per element with RIP at the instruction, RFLAGS.RF set, and RCX/RSI
already stepped for that element; REP INS exits once per chunk of up to
1024 elements within one page, with the registers from before the chunk.

String I/O goes the framework's way: the service reads or writes guest
memory itself (``dispatcher.string_exec``), as many elements as it chooses.
For INS the I/O data page is then filled from guest memory at the addresses
KVM will store to, so KVM's own store rewrites the same bytes; a REP OUTS
element's frame carries RCX and RSI from before that element.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, NamedTuple

from dispatcher import wire
from dispatcher.wire import (
    COMPLETION,
    COMPLETION_PAYLOAD,
    COMPLETION_SIZE,
    COMPLETION_STRUCT,
    PROTOCOL_VERSION,
    Completion,
    Offset,
    Registers,
    Status,
    decode_completion,
)
from dispatcher.x86 import InstructionError, IoInstruction, Segment, decode_io_instruction, ip_mask

from .syncregs import CpuContext, RegisterIndex
from .vm import KvmError

__all__ = [
    "REFUSED",
    "SIMPLE_FRAME",
    "Action",
    "FrameBuilder",
    "IoCapture",
    "IoDecodeError",
    "IoKind",
    "PendingIo",
    "PostedOut",
    "SimpleIo",
    "SimpleTemplate",
    "merge_in",
    "plan_completion",
    "posted_confirmed",
    "read_completion",
    "usual_action",
]

_RAX, _RCX, _RDX, _RSI, _RDI = RegisterIndex.RAX, RegisterIndex.RCX, 3, RegisterIndex.RSI, RegisterIndex.RDI
_RIP, _RFLAGS = RegisterIndex.RIP, RegisterIndex.RFLAGS
_RF, _DF = 1 << 16, 1 << 10
_MASK64: Final = (1 << 64) - 1
_VALUE_MASK = (0, 0xFF, 0xFFFF, 0, 0xFFFF_FFFF)
# Completion statuses after which the instruction did not run: re-entering would only repeat the exit.
REFUSED: Final = frozenset({Status.PROTOCOL_ERROR, Status.UNSUPPORTED, Status.MEMORY_ERROR})


class IoDecodeError(KvmError):
    """The bytes at the vCPU's RIP are not the I/O instruction KVM reported."""


class IoKind(enum.IntEnum):
    IN = 0
    OUT = 1
    INS = 2
    OUTS = 3


class IoCapture(NamedTuple):
    """What a vCPU thread copies out of ``kvm_run`` at an I/O exit.

    ``is_write`` is True for OUT/OUTS. ``code_at`` holds up to 16 bytes from
    CS:RIP; ``code_before`` up to 15 bytes ending at CS:RIP (empty unless the
    exit is an OUT). ``data`` is the I/O data page's ``size * count`` bytes
    for an OUT/OUTS. ``plain_out`` says the bytes before RIP end in a
    non-string OUT to this port, which is then the instruction (a posted
    write is decoded that way). ``generation`` changes whenever ``context``
    does.
    """

    is_write: bool
    size: int
    port: int
    elements: int
    regs: tuple[int, ...]
    context: CpuContext
    interrupt_shadow: bool
    interruption_pending: bool
    cr8: int
    data: bytes
    code_at: bytes
    code_before: bytes
    plain_out: bool = False
    generation: int = 0


@dataclass(slots=True, eq=False)
class PendingIo:
    """One intercept in flight: the frame, and what applying its completion means.

    ``before`` and ``kvm_after`` are (RIP, RAX, RCX, RSI, RDI): the registers
    at the intercept, and those KVM will hold once it has finished the
    instruction on its own (for IN, with the completion's data). ``chunk`` is,
    for INS, the guest-linear address of the element KVM stores first, and
    ``posted`` marks an OUT the vCPU did not wait for.
    """

    kind: IoKind
    vp_index: int
    partition: int
    port: int
    size: int
    count: int
    frame: bytes
    before: tuple[int, int, int, int, int]
    kvm_after: tuple[int, int, int, int, int]
    reverse: bool = False
    chunk: int = 0
    posted: bool = False


class Action(NamedTuple):
    """How a vCPU applies a completion.

    ``data``: bytes for the I/O data page (IN/INS), else None. ``registers``:
    None when KVM's own completion of the instruction gives exactly what the
    completion says; else (RIP, RAX, RCX, RSI, RDI) to set after KVM has
    finished the instruction. ``refused``: a reason the VP must stop (the
    instruction cannot run), else None.
    """

    data: bytes | None
    registers: tuple[int, int, int, int, int] | None
    refused: str | None = None


@lru_cache(maxsize=4096)
def _decode(code: bytes, bits: int) -> IoInstruction | None:
    # The decoder caches what decodes; the backward scan mostly tries byte runs that do not, so those are cached too.
    try:
        return decode_io_instruction(code, bits)
    except InstructionError:
        return None


def _matches(insn: IoInstruction | None, is_write: bool, size: int, port: int, rdx: int) -> bool:
    if insn is None or insn.is_write != is_write or insn.size != size:
        return False
    return (insn.port if insn.port is not None else rdx & 0xFFFF) == port


def _find_backwards(code: bytes, bits: int, is_write: bool, size: int, port: int, rdx: int) -> list[IoInstruction]:
    # Every I/O instruction that ends exactly where ``code`` ends, shortest first.
    found = []
    for k in range(1, len(code) + 1):
        insn = _decode(code[-k:], bits)
        if insn is not None and insn.length == k and _matches(insn, is_write, size, port, rdx):
            found.append(insn)
    return found


def _forward_out(capture: IoCapture, bits: int, rdx: int, *, plain: bool) -> IoInstruction | None:
    # The OUT at RIP, if KVM reports it there: a REP OUTS, or (``plain``) a non-string OUT.
    insn = _decode(capture.code_at, bits)
    if insn is None or not _matches(insn, True, capture.size, capture.port, rdx):
        return None
    return insn if (insn.string and insn.rep) or (plain and not insn.string) else None


def _step(value: int, delta: int, amask: int) -> int:
    # Move an index or counter register the way the CPU does at this address size.
    return (value & ~amask & _MASK64) | ((value + delta) & amask)


def _locate(
    capture: IoCapture, out_rip_advanced: bool, read_linear: Callable[[int, int], bytes | None]
) -> tuple[IoInstruction, int]:
    # The I/O instruction KVM reported and its RIP.
    is_write, size, port, count, regs, ctx = capture[:6]
    bits = ctx.code_bits
    rip, rflags, rdx = regs[_RIP], regs[_RFLAGS], regs[_RDX]
    at = rip
    insn: IoInstruction | None = None
    if not is_write:
        insn = _decode(capture.code_at, bits)
        if not _matches(insn, False, size, port, rdx):
            insn = None
    else:
        # REP OUTS exits mid-instruction (RF set, RIP at it); so does a plain OUT where KVM does not advance RIP.
        if rflags & _RF or not out_rip_advanced:
            insn = _forward_out(capture, bits, rdx, plain=not out_rip_advanced)
        if insn is None:
            candidates = _find_backwards(capture.code_before, bits, True, size, port, rdx)
            if capture.plain_out:
                candidates = [c for c in candidates if not c.string]
            elif len(candidates) > 1 and candidates[0].string:
                candidates.sort(key=lambda c: not _outs_source_matches(c, capture, read_linear))
            if candidates:
                insn = candidates[0]
                at = (rip - insn.length) & ip_mask(bits)
        if insn is None:
            insn = _forward_out(capture, bits, rdx, plain=False)  # a last REP OUTS element without RF
    if insn is None or (count > 1 and not insn.string):
        raise IoDecodeError(
            f"no {'OUT' if is_write else 'IN'} of {size} bytes to port {port:#x} (count {count}) at "
            f"CS:RIP {ctx.cs.selector:#x}:{rip:#x}; code {capture.code_before.hex()}|{capture.code_at.hex()}"
        )
    return insn, at


class PostedOut(NamedTuple):
    """A posted OUT in flight: what its completion must confirm (RIP past it, RAX as it was)."""

    next_rip: int
    rax: int
    port: int
    at: int


class SimpleIo(NamedTuple):
    """A non-string IN or OUT in flight that its vCPU waits for.

    Enough to apply the usual completion (:func:`usual_action`); anything
    else goes through :meth:`FrameBuilder.pending_of` and
    :func:`plan_completion`.
    """

    is_write: bool
    size: int
    port: int
    elements: int
    at: int
    next_rip: int
    regs: tuple[int, ...]


class SimpleTemplate(NamedTuple):
    """A non-string intercept with RFLAGS and RAX left out: the frame's bytes around them and the RIPs."""

    head: bytes  # up to RFLAGS
    middle: bytes  # from the port number up to RAX
    tail: bytes  # from the instruction bytes on
    at: int
    next_rip: int


# RFLAGS and RAX are 8 bytes each, spliced between the template's pieces.
assert Offset.RFLAGS + 8 == Offset.PORT and Offset.RAX + 8 == Offset.INSTRUCTION_BYTES
SIMPLE_FRAME: Final = struct.Struct(
    f"<{Offset.RFLAGS}sQ{Offset.RAX - Offset.PORT}sQ{wire.INTERCEPT_SIZE - Offset.INSTRUCTION_BYTES}s"
)
"""A non-string intercept from its template: ``SIMPLE_FRAME.pack(head, rflags, middle, rax, tail)``."""
_pack_simple = SIMPLE_FRAME.pack
_TEMPLATE_LIMIT = 4096
# The fields past RAX of a simple intercept: zero, as the seed says.
_NO_STRING: Final = (0, 0, b"", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


class FrameBuilder:
    """Builds the intercepts of one VP, remembering non-string ones by where they happened.

    A non-string IN or OUT at the same RIP, with the same code bytes, mode
    (``capture.generation`` numbers the VP's distinct contexts), port, size,
    CR8 and event state gives the same frame except RFLAGS and RAX, so those
    are spliced into a cached template instead of decoding again.
    """

    def __init__(
        self,
        *,
        vp_index: int,
        partition: int,
        out_rip_advanced: bool,
        read_linear: Callable[[int, int], bytes | None],
    ) -> None:
        self.vp_index = vp_index
        self.partition = partition
        self.out_rip_advanced = out_rip_advanced
        self.read_linear = read_linear
        self.templates: dict[tuple[object, ...], SimpleTemplate] = {}
        """The templates by :meth:`template_key`."""

    @staticmethod
    def template_key(capture: IoCapture) -> tuple[object, ...]:
        """What a non-string exit's frame depends on, RFLAGS and RAX aside (the key of :attr:`templates`)."""
        return (capture.generation, capture.regs[_RIP], capture.port, capture.size, capture.is_write, capture.cr8,
                capture.interrupt_shadow, capture.interruption_pending, capture.code_at,
                capture.code_before)  # fmt: skip

    def simple(self, capture: IoCapture) -> tuple[bytes, SimpleTemplate] | None:
        """The frame of a non-string exit and its template, or None for a string one."""
        regs = capture.regs
        key = self.template_key(capture)
        template = self.templates.get(key)
        if template is None:
            insn, at = _locate(capture, self.out_rip_advanced, self.read_linear)
            if insn.string:
                return None
            frame = self._frame(capture, insn, at)
            next_rip = (at + insn.length) & ip_mask(capture.context.code_bits)
            template = SimpleTemplate(
                frame[: Offset.RFLAGS], frame[Offset.PORT : Offset.RAX], frame[Offset.INSTRUCTION_BYTES :], at, next_rip
            )
            if len(self.templates) >= _TEMPLATE_LIMIT:
                self.templates.clear()
            self.templates[key] = template
        frame = _pack_simple(template.head, regs[_RFLAGS], template.middle, regs[_RAX], template.tail)
        return frame, template

    def simple_io(self, capture: IoCapture) -> tuple[bytes, SimpleIo] | None:
        """The frame of a non-string exit and its in-flight record, or None for a string one."""
        simple = self.simple(capture)
        if simple is None:
            return None
        frame, template = simple
        return frame, SimpleIo(capture.is_write, capture.size, capture.port, capture.elements, template.at,
                               template.next_rip, capture.regs)  # fmt: skip

    def pending_of(self, io: SimpleIo) -> PendingIo:
        """The :class:`PendingIo` that :meth:`build` gives for the exit ``io`` records (without its frame)."""
        regs = io.regs
        rax, rcx, rsi, rdi = regs[_RAX], regs[_RCX], regs[_RSI], regs[_RDI]
        kind = IoKind.OUT if io.is_write else IoKind.IN
        return PendingIo(kind, self.vp_index, self.partition, io.port, io.size, io.elements, b"",
                         (io.at, rax, rcx, rsi, rdi), (io.next_rip, rax, rcx, rsi, rdi))  # fmt: skip

    def build(self, capture: IoCapture) -> PendingIo:
        """The intercept for one I/O exit. Raises :class:`IoDecodeError` if no matching instruction is found."""
        simple = self.simple(capture)
        regs = capture.regs
        rax, rcx, rsi, rdi = regs[_RAX], regs[_RCX], regs[_RSI], regs[_RDI]
        if simple is not None:
            frame, template = simple
            kind = IoKind.OUT if capture.is_write else IoKind.IN
            return PendingIo(kind, self.vp_index, self.partition, capture.port, capture.size, capture.elements, frame,
                             (template.at, rax, rcx, rsi, rdi), (template.next_rip, rax, rcx, rsi, rdi))  # fmt: skip
        return self._string(capture)

    def _frame(
        self, capture: IoCapture, insn: IoInstruction, at: int, string: tuple[object, ...] = _NO_STRING
    ) -> bytes:
        # ``string``: the fields from InstructionByteCount on, RAX left out (DS and ES, RCX, RSI, RDI).
        ctx, regs = capture.context, capture.regs
        state = ctx.execution_state(
            interrupt_shadow=capture.interrupt_shadow, interruption_pending=capture.interruption_pending
        )
        access_info = capture.size | insn.string << 3 | insn.rep << 4
        count, reserved, code, *rest = string
        return wire.INTERCEPT.pack(wire.IO_PORT_INTERCEPT, wire.IO_PORT_PAYLOAD_SIZE, 0, 0, 0, self.partition,
                                   self.vp_index, insn.length | (capture.cr8 & 0xF) << 4, capture.is_write, state,
                                   *ctx.cs, at, regs[_RFLAGS], capture.port, access_info, count, reserved, regs[_RAX],
                                   code, *rest)  # fmt: skip

    def _string(self, capture: IoCapture) -> PendingIo:
        insn, at = _locate(capture, self.out_rip_advanced, self.read_linear)
        is_write, size, count, regs, ctx = (capture.is_write, capture.size, capture.elements, capture.regs,
                                            capture.context)  # fmt: skip
        bits = ctx.code_bits
        rip = regs[_RIP]
        next_rip = (at + insn.length) & ip_mask(bits)
        rax, rcx, rsi, rdi = regs[_RAX], regs[_RCX], regs[_RSI], regs[_RDI]
        reverse = bool(regs[_RFLAGS] & _DF)
        amask = (1 << insn.address_size) - 1
        step = -size if reverse else size
        kind: IoKind
        before: tuple[int, int, int, int, int]
        kvm_after: tuple[int, int, int, int, int]
        if not is_write:
            kind = IoKind.INS
            before = (at, rax, rcx, rsi, rdi)
            if insn.rep:
                kvm_after = (at, rax, _step(rcx, -count, amask), rsi, _step(rdi, step * count, amask))
            else:
                kvm_after = (next_rip, rax, rcx, rsi, _step(rdi, step, amask))
        else:
            kind = IoKind.OUTS
            # KVM has already stepped RSI (and RCX for REP) for the element it reports.
            before = (at, rax, _step(rcx, 1, amask) if insn.rep else rcx, _step(rsi, -step, amask), rdi)
            kvm_after = (at if insn.rep else next_rip, rax, rcx, rsi, rdi)
        code = (capture.code_at if at == rip else capture.code_before[-insn.length :] + capture.code_at)[:16]
        frame = self._frame(capture, insn, at, (len(code), 0, code, *ctx.ds, *ctx.es, *before[2:]))
        chunk = 0
        if not is_write:
            es_base = ctx.es.base if bits != 64 else 0
            chunk = (es_base + (rdi & amask)) & (_MASK64 if bits == 64 else 0xFFFF_FFFF)
        return PendingIo(kind, self.vp_index, self.partition, capture.port, size, count, frame, before, kvm_after,
                         reverse, chunk)  # fmt: skip


def _outs_source_matches(
    insn: IoInstruction, capture: IoCapture, read_linear: Callable[[int, int], bytes | None]
) -> bool:
    # Whether this candidate OUTS reads the element KVM reported: its segment and
    # address size decide where the element came from.
    ctx, size = capture.context, capture.size
    amask = (1 << insn.address_size) - 1
    step = -size if capture.regs[_RFLAGS] & _DF else size
    offset = (capture.regs[_RSI] - step) & amask
    segment = insn.segment
    register = (ctx.es, ctx.cs, ctx.ss, ctx.ds, ctx.fs, ctx.gs)[segment]
    bits = ctx.code_bits
    # 64-bit code ignores the bases of ES, CS, SS and DS.
    base = register.base if bits != 64 or segment in (Segment.FS, Segment.GS) else 0
    linear = (base + offset) & (_MASK64 if bits == 64 else 0xFFFF_FFFF)
    return read_linear(linear, size) == capture.data[:size]


def merge_in(rax: int, value: int, size: int) -> int:
    """RAX after an IN of ``size`` bytes read ``value`` (8/16 bits keep the rest, 32 bits zero-extend)."""
    if size == 4:
        return value & 0xFFFF_FFFF
    return (rax & ~_VALUE_MASK[size] & _MASK64) | (value & _VALUE_MASK[size])


_STATUS_OF: Final = {int(status): status for status in Status}
_REGISTERS_OF: Final = tuple(Registers(bits) for bits in range(32))


def read_completion(frame: bytes) -> Completion:
    """The completion in ``frame``, exactly as :func:`dispatcher.wire.decode_completion` gives it.

    Completions arrive at tens of thousands a second, so a frame of the usual
    shape (its type and size, this protocol version, a known status) is
    unpacked directly; any other goes to ``decode_completion``, which raises
    the :class:`~dispatcher.FrameError` that names what is wrong.
    """
    if len(frame) == COMPLETION_SIZE:
        (kind, size, _flags, _r6, _r7, partition, vp_index, version, status, registers, rip, rax, rcx, rsi, rdi, port,
         access_info, _reserved, detail) = COMPLETION_STRUCT.unpack_from(frame)  # fmt: skip
        if kind == COMPLETION and size == COMPLETION_PAYLOAD and version == PROTOCOL_VERSION and status in _STATUS_OF:
            return Completion(vp_index, _STATUS_OF[status], _REGISTERS_OF[registers & 0x1F], rip, rax, rcx, rsi, rdi,
                              partition, port, access_info, detail, version)  # fmt: skip
    return decode_completion(frame)


_COMPLETED = int(Status.COMPLETED)
_RIP_ONLY, _RIP_RAX = int(Registers.RIP), int(Registers.RIP | Registers.RAX)
_NOT_OUT = int(Registers.RCX | Registers.RSI | Registers.RDI)
_NOTHING: Final = Action(None, None)


def usual_action(io: SimpleIo, frame: bytes) -> Action | None:
    """The action for the completion a simple IN or OUT usually gets, or None for any other completion.

    Usual: COMPLETED, RIP past the instruction, and for an IN RAX merged
    as the architecture does; the answer is then what
    :func:`plan_completion` gives, without decoding the frame into a
    :class:`~dispatcher.wire.Completion`.
    """
    if len(frame) != COMPLETION_SIZE:
        return None
    (kind, size, _flags, _r6, _r7, _partition, _vp, version, status, registers, rip, rax, _rcx, _rsi, _rdi, _port,
     _access_info, _reserved, _detail) = COMPLETION_STRUCT.unpack_from(frame)  # fmt: skip
    if (
        kind != COMPLETION
        or size != COMPLETION_PAYLOAD
        or version != PROTOCOL_VERSION
        or status != _COMPLETED
        or rip != io.next_rip
    ):
        return None
    if io.is_write:
        return _NOTHING if registers == _RIP_ONLY or (registers == _RIP_RAX and rax == io.regs[_RAX]) else None
    value = rax & _VALUE_MASK[io.size]
    if registers != _RIP_RAX or merge_in(io.regs[_RAX], value, io.size) != rax:
        return None
    return Action(value.to_bytes(io.size, "little"), None)


def posted_confirmed(posted: PostedOut, frame: bytes) -> bool:
    """True if ``frame`` is a completion that confirms the state a posted OUT left (see :class:`PostedOut`)."""
    if len(frame) != COMPLETION_SIZE:
        return False
    (kind, size, _flags, _r6, _r7, _partition, _vp, version, status, registers, rip, rax, _rcx, _rsi, _rdi, _port,
     _access_info, _reserved, _detail) = COMPLETION_STRUCT.unpack_from(frame)  # fmt: skip
    return (
        kind == COMPLETION
        and size == COMPLETION_PAYLOAD
        and version == PROTOCOL_VERSION
        and status in _STATUS_OF
        and _STATUS_OF[status] not in REFUSED
        and not registers & _NOT_OUT
        and registers & _RIP_ONLY != 0
        and rip == posted.next_rip
        and (not registers & _RIP_RAX & ~_RIP_ONLY or rax == posted.rax)
    )


# Plain ints: an IntFlag on either side of ``&`` goes through the enum machinery.
_REGISTER_BITS: Final = tuple(map(int, (Registers.RIP, Registers.RAX, Registers.RCX, Registers.RSI, Registers.RDI)))


def plan_completion(pending: PendingIo, completion: Completion, read_chunk: Callable[[PendingIo], bytes]) -> Action:
    """What the vCPU must do so the guest sees exactly what the completion says.

    ``read_chunk(pending)`` returns the guest-memory bytes KVM is about to
    store for an INS chunk, in the order KVM stores them.
    """
    named = int(completion.registers)
    values = (completion.rip, completion.rax, completion.rcx, completion.rsi, completion.rdi)
    target = tuple(
        value if named & bit else old for bit, value, old in zip(_REGISTER_BITS, values, pending.before, strict=True)
    )
    refused = None
    if completion.status in REFUSED:
        refused = (
            f"port {pending.port:#x} {pending.kind.name} at RIP {pending.before[0]:#x} refused: "
            f"{completion.status.name} (detail {completion.detail:#x})"
        )
    kind, data = pending.kind, None
    kvm_after = pending.kvm_after
    if kind is IoKind.IN:
        value = target[1] & _VALUE_MASK[pending.size]
        data = value.to_bytes(pending.size, "little")
        kvm_after = (kvm_after[0], merge_in(pending.before[1], value, pending.size), *kvm_after[2:])
    elif kind is IoKind.INS:
        data = read_chunk(pending)
    registers = None if target == kvm_after else target
    return Action(data, registers, refused)  # type: ignore[arg-type]
