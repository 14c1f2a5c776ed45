"""The vCPU state KVM leaves in ``kvm_run`` after every exit (KVM_CAP_SYNC_REGS).

With ``kvm_valid_regs`` set, KVM stores the general registers, the special
registers and the pending events into the vCPU's mmap at every exit, so a
VMM reads them with ``struct`` instead of two ioctls (on this host
``KVM_GET_REGS`` + ``KVM_GET_SREGS`` cost more than the exit itself).
Writing registers back is the reverse: change ``s.regs`` and set
``kvm_dirty_regs``; KVM loads them at the start of the next ``KVM_RUN``,
*before* it completes a pending I/O, so that must be done first (see
:meth:`~transports.kvm.Vcpu.complete_pending_io`).

Layout (``struct kvm_sync_regs`` at offset 304 of ``kvm_run``): ``kvm_regs``
(144 bytes), ``kvm_sregs`` (312), ``kvm_vcpu_events`` (64); checked in
tests/kvm/test_kvm_abi.py.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from dispatcher import SegmentAttributes, SegmentRegister
from dispatcher.x86 import code_size

from . import abi

__all__ = [
    "CONTEXT_SIZE",
    "EVENTS_OFFSET",
    "REGS_OFFSET",
    "REGS_STRUCT",
    "SREGS_OFFSET",
    "SYNC_ALL",
    "CpuContext",
    "RegisterIndex",
    "parse_context",
    "parse_events",
]

REGS_OFFSET: Final = abi.KVM_RUN_SYNC_REGS_OFFSET
SREGS_OFFSET: Final = REGS_OFFSET + 144
EVENTS_OFFSET: Final = SREGS_OFFSET + 312
SYNC_ALL: Final = abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS | abi.KVM_SYNC_X86_EVENTS

REGS_STRUCT: Final = struct.Struct("<18Q")  # rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip rflags
CONTEXT_SIZE: Final = 272  # kvm_sregs up to and including EFER: all that CpuContext depends on


class RegisterIndex:
    """Positions in :data:`REGS_STRUCT` (``struct kvm_regs`` order)."""

    RAX: Final = 0
    RCX: Final = 2
    RSI: Final = 4
    RDI: Final = 5
    RIP: Final = 16
    RFLAGS: Final = 17


# kvm_sregs: cs ds es fs gs ss (each kvm_segment: base, limit, selector, type, present, dpl, db, s, l, g,
# avl, unusable, padding), then tr, ldt, gdt, idt (80 bytes), cr0, cr2, cr3, cr4, cr8, efer.
_SEGMENT = "QIH10B"
_CONTEXT = struct.Struct("<" + _SEGMENT * 6 + "80xQ32xQ")
assert _CONTEXT.size == CONTEXT_SIZE
_EVENTS = struct.Struct("<B7xBxxBBxxx")  # exception.injected, interrupt.injected, .shadow, nmi.injected

_CR0_PE, _CR0_AM, _CR0_PG = 1, 1 << 18, 1 << 31
_EFER_LMA = 1 << 10
_STATE_LMA = 1 << 4  # EFER.LMA's bit in the intercept's ExecutionState


class CpuContext(NamedTuple):
    """The mode and segments of a vCPU, as an intercept message describes them.

    ``fs``, ``gs`` and ``ss`` are kept for string I/O with a segment override.
    """

    cs: SegmentRegister
    ds: SegmentRegister
    es: SegmentRegister
    fs: SegmentRegister
    gs: SegmentRegister
    ss: SegmentRegister
    cr0: int
    efer: int
    cpl: int

    @property
    def protected(self) -> bool:
        return bool(self.cr0 & _CR0_PE)

    @property
    def paging(self) -> bool:
        return bool(self.cr0 & _CR0_PG)

    @property
    def long_mode(self) -> bool:
        """EFER.LMA: long mode is active (64-bit or compatibility code)."""
        return bool(self.efer & _EFER_LMA)

    @property
    def code_bits(self) -> int:
        """16, 32 or 64: the default operand and address size of the code."""
        return code_size(_STATE_LMA if self.efer & _EFER_LMA else 0, self.cs.attributes)

    def execution_state(self, *, interrupt_shadow: bool, interruption_pending: bool) -> int:
        """The intercept's ExecutionState word (CPL, CR0.PE, CR0.AM, EFER.LMA, shadow, pending)."""
        return (
            self.cpl
            | bool(self.cr0 & _CR0_PE) << 2
            | bool(self.cr0 & _CR0_AM) << 3
            | (_STATE_LMA if self.efer & _EFER_LMA else 0)
            | interruption_pending << 6
            | interrupt_shadow << 12
        )


def _segment(fields: tuple[int, ...]) -> SegmentRegister:
    base, limit, selector, type_, present, dpl, db, s, long, g, avl, _unusable, _pad = fields
    attributes = type_ | s << 4 | dpl << 5 | present << 7 | avl << 12 | long << 13 | db << 14 | g << 15
    return SegmentRegister(base, limit, selector, SegmentAttributes(attributes))


def parse_context(sregs: bytes) -> CpuContext:
    """A :class:`CpuContext` from the first :data:`CONTEXT_SIZE` bytes of ``kvm_sregs``."""
    fields = _CONTEXT.unpack(sregs)
    segments = [_segment(fields[i : i + 13]) for i in range(0, 78, 13)]
    cs, ds, es, fs, gs, ss = segments
    cr0, efer = fields[78], fields[79]
    # CPL is SS.DPL (what VMX reports; equal to CS.RPL outside transitions); real mode is 0.
    cpl = ss.attributes >> 5 & 3 if cr0 & _CR0_PE else 0
    return CpuContext(cs, ds, es, fs, gs, ss, cr0, efer, cpl)


def parse_events(events: bytes) -> tuple[bool, bool]:
    """(interrupt shadow, interruption pending) from the first 16 bytes of ``kvm_vcpu_events``."""
    exception, interrupt, shadow, nmi = _EVENTS.unpack_from(events)
    return bool(shadow), bool(exception or interrupt or nmi)
