"""What a transport knows of its guest beyond the intercept: memory and the hooks string I/O needs.

A transport that carries guest memory (KVM, a UNIX connection with shared
memfds) declares a :class:`Guest` as its ``guest`` attribute; the
:class:`~dispatcher.Dispatcher` gives it to the engine serving that
transport, so INS/OUTS move their bytes there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from .fields import SegmentRegister
from .guest_memory import GuestMemory
from .x86 import Segment

__all__ = ["Guest", "SegmentSource", "Translate", "identity_translation"]

Translate: TypeAlias = Callable[[int, int, int, bool], "int | None"]
"""``translate(partition, vp_index, linear, write)``: the guest-physical address of the
byte at ``linear``, valid to the end of its 4 KiB page, or None if the guest's page
tables do not allow the access (the VMM raises the #PF)."""

SegmentSource: TypeAlias = Callable[[int, int, Segment], "SegmentRegister | None"]
"""``segments(partition, vp_index, segment)``: the current SS, FS or GS of a VP (which the
intercept does not carry), or None if unknown."""


def identity_translation(partition: int, vp_index: int, linear: int, write: bool) -> int:
    """The translation hook of a guest whose page tables map every address to itself."""
    return linear


@dataclass(frozen=True, slots=True)
class Guest:
    """Guest memory, and the hooks that reach what an intercept does not carry.

    ``translate`` turns linear into guest-physical addresses where the guest
    may page (required in long mode); ``segments`` supplies SS, FS and GS for
    string I/O with those overrides. Either may be None.
    """

    memory: GuestMemory
    translate: Translate | None = None
    segments: SegmentSource | None = None
