"""Bit-field values inside the I/O port intercept message.

Each is an ``int`` subclass: it compares equal to its raw value, packs as a
plain integer and names its bits as properties. Reserved bits are kept, so a
decoded value encodes back to the same bytes.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

__all__ = [
    "Access",
    "AccessInfo",
    "AccessType",
    "ExecutionState",
    "SegmentAttributes",
    "SegmentRegister",
]


class AccessType(enum.IntEnum):
    """InterceptAccessType: the direction of one intercepted access, as the message encodes it."""

    READ = 0
    WRITE = 1
    EXECUTE = 2


class Access(enum.IntFlag):
    """The directions a claim or an announced port range covers."""

    READ = 1
    WRITE = 2
    READ_WRITE = 3


class ExecutionState(int):
    """The 16-bit ExecutionState of the intercepted virtual processor."""

    __slots__ = ()

    @classmethod
    def build(
        cls,
        *,
        cpl: int = 0,
        cr0_pe: bool = False,
        cr0_am: bool = False,
        efer_lma: bool = False,
        debug_active: bool = False,
        interruption_pending: bool = False,
        vtl: int = 0,
        enclave: bool = False,
        interrupt_shadow: bool = False,
        virtualization_fault: bool = False,
    ) -> ExecutionState:
        """Compose a value from its bits."""
        if not 0 <= cpl <= 3:
            raise ValueError(f"cpl must be 0..3, not {cpl}")
        if not 0 <= vtl <= 15:
            raise ValueError(f"vtl must be 0..15, not {vtl}")
        return cls(
            cpl
            | cr0_pe << 2
            | cr0_am << 3
            | efer_lma << 4
            | debug_active << 5
            | interruption_pending << 6
            | vtl << 7
            | enclave << 11
            | interrupt_shadow << 12
            | virtualization_fault << 13
        )

    @property
    def cpl(self) -> int:
        return self & 0x3

    @property
    def cr0_pe(self) -> bool:
        return bool(self & 1 << 2)

    @property
    def cr0_am(self) -> bool:
        return bool(self & 1 << 3)

    @property
    def efer_lma(self) -> bool:
        return bool(self & 1 << 4)

    @property
    def debug_active(self) -> bool:
        return bool(self & 1 << 5)

    @property
    def interruption_pending(self) -> bool:
        return bool(self & 1 << 6)

    @property
    def vtl(self) -> int:
        return self >> 7 & 0xF

    @property
    def enclave(self) -> bool:
        return bool(self & 1 << 11)

    @property
    def interrupt_shadow(self) -> bool:
        return bool(self & 1 << 12)

    @property
    def virtualization_fault(self) -> bool:
        return bool(self & 1 << 13)


class SegmentAttributes(int):
    """The 16-bit attribute word of a segment register (the descriptor's flags)."""

    __slots__ = ()

    @classmethod
    def build(
        cls,
        *,
        type: int = 0,
        s: bool = False,
        dpl: int = 0,
        present: bool = False,
        avl: bool = False,
        long: bool = False,
        default_big: bool = False,
        granularity: bool = False,
    ) -> SegmentAttributes:
        """Compose a value from its bits."""
        if not 0 <= type <= 15:
            raise ValueError(f"type must be 0..15, not {type}")
        if not 0 <= dpl <= 3:
            raise ValueError(f"dpl must be 0..3, not {dpl}")
        return cls(
            type | s << 4 | dpl << 5 | present << 7 | avl << 12 | long << 13 | default_big << 14 | granularity << 15
        )

    @property
    def type(self) -> int:
        return self & 0xF

    @property
    def s(self) -> bool:
        """Code or data segment (True) rather than a system segment."""
        return bool(self & 1 << 4)

    @property
    def dpl(self) -> int:
        return self >> 5 & 0x3

    @property
    def present(self) -> bool:
        return bool(self & 1 << 7)

    @property
    def avl(self) -> bool:
        return bool(self & 1 << 12)

    @property
    def long(self) -> bool:
        """L: a 64-bit code segment."""
        return bool(self & 1 << 13)

    @property
    def default_big(self) -> bool:
        """D/B: 32-bit default operand and address size."""
        return bool(self & 1 << 14)

    @property
    def granularity(self) -> bool:
        return bool(self & 1 << 15)


class SegmentRegister(NamedTuple):
    """A segment register as the message carries it (16 bytes)."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    attributes: SegmentAttributes = SegmentAttributes(0x93)


class AccessInfo(int):
    """HV_X64_IO_PORT_ACCESS_INFO: access size, string and REP flags."""

    __slots__ = ()

    @classmethod
    def build(cls, access_size: int, *, string_op: bool = False, rep_prefix: bool = False) -> AccessInfo:
        """Compose a value; ``access_size`` is the byte count (1, 2 or 4)."""
        if access_size not in (1, 2, 4):
            raise ValueError(f"access_size must be 1, 2 or 4, not {access_size}")
        if rep_prefix and not string_op:
            raise ValueError("rep_prefix needs string_op")
        return cls(access_size | string_op << 3 | rep_prefix << 4)

    @property
    def access_size(self) -> int:
        return self & 0x7

    @property
    def string_op(self) -> bool:
        return bool(self & 1 << 3)

    @property
    def rep_prefix(self) -> bool:
        return bool(self & 1 << 4)
