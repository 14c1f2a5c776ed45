"""Measure how this host's KVM reports port I/O exits.

``python -m transports.kvm.probe examples/guests/io_probe.bin`` runs the
probe guest and records, for every I/O exit, the registers KVM shows at the
exit and, optionally, after the exit has been completed with
``immediate_exit`` (so without running further guest code). docs/KVM.md
explains the results; they differ between KVM back ends (VMX fast path,
SVM, the instruction emulator), which is why this is a tool and not a
constant.
"""

from __future__ import annotations

import argparse
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .boot import boot_flat_image
from .exits import HltExit, IoExit, VcpuExit
from .vm import Vcpu, Vm

__all__ = ["ProbeExit", "format_table", "run_probe"]

_RECORD_ADDR = 0x600
_EXIT_PORT = 0x501


@dataclass(frozen=True, slots=True)
class ProbeExit:
    """One I/O exit of the probe guest, with the state around it."""

    mode: str  # "real", "protected32" or "long64"
    case: int  # case id from the guest's record (see io_probe.asm)
    insn_addr: int  # address of the case's I/O instruction
    is_write: bool  # OUT/OUTS
    size: int
    port: int
    count: int
    data_offset: int
    data: bytes  # OUT: what the guest wrote; IN: what the probe supplied
    before: tuple[int, int, int, int]  # (rcx, rsi, rdi, rax) the guest set up for the case
    at_exit: tuple[int, int, int, int, int, int]  # (rip, rcx, rsi, rdi, rax, rflags) at the exit
    completed: tuple[int, int, int, int, int] | None  # (rip, rcx, rsi, rdi, rax) after completion

    @property
    def rip_delta_at_exit(self) -> int:
        """RIP at the exit minus the instruction's address (0 = not advanced yet)."""
        return self.at_exit[0] - self.insn_addr

    @property
    def rip_delta_completed(self) -> int | None:
        """RIP after completion minus the instruction's address."""
        return None if self.completed is None else self.completed[0] - self.insn_addr


def _mode(vcpu: Vcpu) -> str:
    sregs = vcpu.get_sregs()
    if sregs.efer & (1 << 10):  # EFER.LMA
        return "long64"
    return "protected32" if sregs.cr0 & 1 else "real"


def _iter_exits(vm: Vm, vcpu: Vcpu, complete: bool, max_exits: int) -> Iterator[ProbeExit]:
    fill = 0xA1
    for _ in range(max_exits):
        exit: VcpuExit = vcpu.run()
        if isinstance(exit, HltExit):
            return
        if not isinstance(exit, IoExit):
            raise RuntimeError(f"probe guest stopped with {exit!r}")
        if exit.port == _EXIT_PORT:
            return
        case, insn, ecx0, esi0, edi0, eax0 = struct.unpack("<6I", vm.read_memory(_RECORD_ADDR, 24))
        regs = vcpu.get_regs()
        at_exit = (regs.rip, regs.rcx, regs.rsi, regs.rdi, regs.rax, regs.rflags)
        mode = _mode(vcpu)
        if exit.is_write:
            data = vcpu.read_io_data(exit)
        else:
            n = exit.size * exit.count
            data = bytes((fill + i) & 0xFF for i in range(n))
            fill = (fill + n) & 0xFF
            vcpu.write_io_data(exit, data)
        completed: tuple[int, int, int, int, int] | None = None
        if complete:
            vcpu.complete_pending_io()
            after = vcpu.get_regs()
            completed = (after.rip, after.rcx, after.rsi, after.rdi, after.rax)
        yield ProbeExit(
            mode=mode,
            case=case,
            insn_addr=insn,
            is_write=exit.is_write,
            size=exit.size,
            port=exit.port,
            count=exit.count,
            data_offset=exit.data_offset,
            data=data,
            before=(ecx0, esi0, edi0, eax0),
            at_exit=at_exit,
            completed=completed,
        )
    raise RuntimeError(f"probe guest did not finish within {max_exits} exits")


def run_probe(image: bytes, *, complete: bool = True, max_exits: int = 100_000) -> list[ProbeExit]:
    """Run the probe guest ``image`` (``examples/guests/io_probe``) once.

    ``complete`` adds the after-completion state to each exit.
    """
    vm, vcpu = boot_flat_image(image)
    with vm:
        return list(_iter_exits(vm, vcpu, complete, max_exits))


def _hex(value: int | None) -> str:
    return "-" if value is None else f"{value:#x}"


def format_table(exits: list[ProbeExit], *, collapse: bool = True) -> str:
    """A Markdown table; ``collapse`` merges runs of identical-looking exits of one case."""
    header = (
        "| mode | case | dir | size | port | count | RIP-insn at exit | RCX,RSI,RDI before"
        " | RCX,RSI,RDI at exit | RIP-insn after | RCX,RSI,RDI after | RAX before -> after |"
    )
    lines = [header, "|" + "---|" * 12]
    previous: tuple[object, ...] | None = None
    repeat = 0

    def row(e: ProbeExit, times: int) -> str:
        rip, rcx, rsi, rdi, _rax, _fl = e.at_exit
        comp = e.completed
        after = "-" if comp is None else f"{_hex(comp[1])},{_hex(comp[2])},{_hex(comp[3])}"
        rax = "-" if comp is None or e.is_write else f"{_hex(e.before[3])} -> {_hex(comp[4])}"
        count = f"{e.count}" + (f" (x{times} exits)" if times > 1 else "")
        direction = "out" if e.is_write else "in"
        return (
            f"| {e.mode} | {e.case} | {direction} | {e.size} | {e.port:#x} | {count} | {rip - e.insn_addr}"
            f" | {_hex(e.before[0])},{_hex(e.before[1])},{_hex(e.before[2])}"
            f" | {_hex(rcx)},{_hex(rsi)},{_hex(rdi)} | {_hex(e.rip_delta_completed)} | {after} | {rax} |"
        )

    pending: ProbeExit | None = None
    for e in exits:
        key = (e.mode, e.case, e.is_write, e.size, e.count, e.rip_delta_at_exit, e.rip_delta_completed)
        if collapse and key == previous:
            repeat += 1
            continue
        if pending is not None:
            lines.append(row(pending, repeat))
        pending, previous, repeat = e, key, 1
    if pending is not None:
        lines.append(row(pending, repeat))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the probe's table for this host."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("image", type=Path, help="the probe guest (examples/guests/io_probe.bin)")
    parser.add_argument("--no-complete", action="store_true", help="do not complete exits with immediate_exit")
    parser.add_argument("--all", action="store_true", help="one row per exit (no collapsing)")
    args = parser.parse_args(argv)
    exits = run_probe(args.image.read_bytes(), complete=not args.no_complete)
    print(format_table(exits, collapse=not args.all))


if __name__ == "__main__":
    main()
