"""A small reference model of INS/OUTS, written from the SDM independently of dispatcher.string_plan.

It executes a whole (REP) instruction one element at a time, with a flat
guest-physical memory (no paging), expand-up segments and no alignment
checks, and stops at the first element that faults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Machine:
    """Registers and memory of one VP; ``memory`` maps [memory_base, memory_base + len)."""

    mode: str  # "real", "protected" or "long"
    rcx: int
    rsi: int
    rdi: int
    df: bool
    segments: dict[str, tuple[int, int]]  # name -> (base, limit)
    memory: bytearray
    memory_base: int = 0
    rip_advanced: bool = False
    faulted: bool = False
    log: list[tuple[bool, int]] = field(default_factory=list)  # (is_write, value) per port access


def execute(
    machine: Machine,
    *,
    outs: bool,
    size: int,
    rep: bool,
    address_size: int,
    segment: str | None,
    device_read: Callable[[], int],
) -> None:
    """Run one INS (``outs=False``) or OUTS to completion or to its first fault."""
    mask = (1 << address_size) - 1
    count = machine.rcx & mask if rep else 1
    name = "es" if not outs else (segment or "ds")
    base, limit = machine.segments[name]
    if machine.mode == "long":
        base = 0
    space = 1 << (64 if machine.mode == "long" else 32)
    while count:
        index = (machine.rsi if outs else machine.rdi) & mask
        if machine.mode != "long" and index + size - 1 > limit:
            machine.faulted = True
            return
        linear = (base + index) % space
        start = linear - machine.memory_base
        if start < 0 or start + size > len(machine.memory):
            machine.faulted = True
            return
        if outs:
            value = int.from_bytes(machine.memory[start : start + size], "little")
            machine.log.append((True, value))
        else:
            value = device_read() & ((1 << 8 * size) - 1)
            machine.log.append((False, value))
            machine.memory[start : start + size] = value.to_bytes(size, "little")
        index = (index + (-size if machine.df else size)) & mask
        if outs:
            machine.rsi = _write_back(machine.rsi, index, address_size)
        else:
            machine.rdi = _write_back(machine.rdi, index, address_size)
        if rep:
            count -= 1
            machine.rcx = _write_back(machine.rcx, count, address_size)
        else:
            count = 0
    machine.rip_advanced = True


def _write_back(register: int, value: int, address_size: int) -> int:
    # A 16-bit register write keeps the upper bits; a 32-bit one zero-extends.
    if address_size == 16:
        return (register & ~0xFFFF & (1 << 64) - 1) | value
    return value
