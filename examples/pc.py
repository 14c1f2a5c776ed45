"""``python -m examples.pc --bios PATH [--disk PATH]``: boot a PC (the example devices on KVM).

The debug console (ports 0x402 and 0xE9) and the serial port (COM1) go to
standard output as the guest writes them. The exit status is the exit
device's (isa-debug-exit at 0x501: ``(value << 1) | 1``, as QEMU gives it),
or 0 once the output shows ``--until`` TEXT;
otherwise the reason is printed on standard error and the status is 2, or
124 after ``--timeout``. ``--backend unix:PATH`` forwards every intercept to
a ``python -m examples serve`` listening at PATH, guest RAM shared with it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from transports.kvm import KvmUnavailableError, kvm_available

from .pc_kvm import MiB, PcConfig, run_pc

__all__ = ["main"]

TIMED_OUT = 124
FAILED = 2


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.pc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bios", required=True, type=Path, help="BIOS image (e.g. /usr/share/seabios/bios.bin)")
    parser.add_argument("--disk", type=Path, help="disk image for ATA device 0 on the primary channel")
    parser.add_argument("--memory", type=int, default=64, metavar="MIB", help="RAM in MiB (default 64)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="stop after this long (0: never)"
    )
    parser.add_argument("--backend", default="inproc", metavar="inproc|unix:PATH", help="where the devices run")
    parser.add_argument("--until", metavar="TEXT", help="stop with status 0 once the guest has printed TEXT")
    parser.add_argument("--no-posted-writes", action="store_true", help="every OUT waits for its completion")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    reason = kvm_available()
    if reason is not None:
        print(f"examples.pc: KVM is not usable here: {reason}", file=sys.stderr)
        return FAILED
    try:
        bios = args.bios.read_bytes()
    except OSError as error:
        print(f"examples.pc: cannot read the BIOS image: {error}", file=sys.stderr)
        return FAILED
    config = PcConfig(
        bios=bios,
        disk=str(args.disk) if args.disk is not None else None,
        memory_size=args.memory * MiB,
        timeout=args.timeout or None,
        serial_sink=_write,
        debug_sink=_write,
        posted_writes=not args.no_posted_writes,
        until=args.until.encode() if args.until else None,
    )
    try:
        if args.backend == "inproc":
            result = anyio.run(run_pc, config)
        elif args.backend.startswith("unix:"):
            from .pc_remote_vmm import run_remote_pc

            result = anyio.run(run_remote_pc, config, args.backend[len("unix:") :])
        else:
            print(f"examples.pc: unknown backend {args.backend!r} (inproc or unix:PATH)", file=sys.stderr)
            return FAILED
    except (KvmUnavailableError, OSError, ValueError) as error:
        print(f"examples.pc: {error}", file=sys.stderr)
        return FAILED
    if result.seen:
        return 0
    if result.exit_status is not None:
        return result.exit_status
    print(f"\nexamples.pc: {result.reason}", file=sys.stderr)
    return TIMED_OUT if result.timed_out else FAILED


if __name__ == "__main__":
    sys.exit(main())
