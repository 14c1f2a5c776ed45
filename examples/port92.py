"""System Control Port A at 0x92: "fast A20" and "fast reset".

Bit 1 (ALT_A20) gates address line 20 without the slow trip through the
keyboard controller; on a board it is ORed with the i8042's A20 gate. A
0-to-1 transition of bit 0 (ALT_RST) pulses the CPU reset line; the bit must
return to 0 (by a write or a system reset) before it can pulse again. The
reserved bits read as the SMSC LPC47 Super I/O datasheet gives them (bits 2
and 5 one, the others zero), so a read of the reset state returns 0x24.

This model owns no memory or CPU, so it reports both through callbacks; a
machine reads :attr:`Port92.a20` to decide what addresses above 1 MiB mean.

Device state (kind ``port92``, version 1): the two bits. A restore calls
neither callback: the machine restoring a VM reads :attr:`Port92.a20`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dispatcher import PortAccess, StateFields, on_port

__all__ = ["Port92"]

RESET = 0x01
A20 = 0x02
RESERVED_ONES = 0x24


class Port92:
    """The port's two bits, with A20 and reset reported through callbacks."""

    state_kind = "port92"
    state_version = 1
    oldest_state_version = 1

    def __init__(
        self,
        *,
        io_base: int = 0x92,
        on_reset: Callable[[], object] | None = None,
        on_a20: Callable[[bool], object] | None = None,
    ) -> None:
        self.io_base = io_base
        self.on_reset = on_reset
        self.on_a20 = on_a20
        self.bits = 0
        self.resets = 0

    @property
    def a20(self) -> bool:
        """True while this port enables A20."""
        return bool(self.bits & A20)

    def reset(self) -> None:
        """A system reset: both bits return to 0 (A20 off, reset re-armed)."""
        if self.bits & A20 and self.on_a20 is not None:
            self.on_a20(False)
        self.bits = 0

    def save(self) -> dict[str, Any]:
        """ALT_A20 and ALT_RST as written."""
        return {"bits": self.bits}

    def restore(self, state: Mapping[str, Any], version: int) -> None:
        """Take a state :meth:`save` returned."""
        self.bits = StateFields(f"{self.state_kind}@{self.io_base:#x}", state).integer("bits", 0, A20 | RESET)

    @on_port(0, max_size=1)
    def port(self, access: PortAccess) -> int | None:
        if not access.is_write:
            return RESERVED_ONES | self.bits
        old, self.bits = self.bits, access.value & (A20 | RESET)
        if (old ^ self.bits) & A20 and self.on_a20 is not None:
            self.on_a20(self.a20)
        if self.bits & RESET and not old & RESET:
            self.resets += 1
            if self.on_reset is not None:
                self.on_reset()
        return None
