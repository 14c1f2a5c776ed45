"""``python -m examples.pc --bios PATH [--disk PATH]``: boot a PC (the example devices on KVM).

The debug console (ports 0x402 and 0xE9) and the serial port (COM1) go to
standard output as the guest writes them. Every run ends with one line on
standard error saying why, and an exit status (:data:`EXIT_STATUSES`):
the exit device's when the guest writes it (isa-debug-exit at 0x501:
``(value << 1) | 1``, as QEMU gives it), 0 once the output shows
``--until`` TEXT, 124 after ``--timeout``, 2 for an error (the vCPU
stopped, a usage error, a BIOS or service that cannot be used).
``--backend unix:PATH`` forwards every intercept to a ``python -m examples
serve`` listening at PATH with the PC's devices, guest RAM shared with it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from dispatcher import DispatchError
from transports.kvm import KvmUnavailableError, kvm_available
from transports.service.command_line import CommandParser, seconds

from .pc_kvm import MiB, PcConfig, PcResult, run_pc

__all__ = ["EXIT_STATUSES", "FAILED", "INTERRUPTED", "SEEN", "TIMED_OUT", "main"]

PROG = "python -m examples.pc"
SEEN, FAILED, TIMED_OUT, INTERRUPTED = 0, 2, 124, 130
EXIT_STATUSES: dict[int | str, str] = {
    SEEN: "the guest printed the --until TEXT",
    "1, 3 ... 255": "the guest wrote VALUE to the exit device: (VALUE << 1) | 1, as QEMU's isa-debug-exit",
    FAILED: "error: a usage error, the vCPU stopped, or the BIOS, disk, KVM or service could not be used",
    TIMED_OUT: "the run reached --timeout",
    INTERRUPTED: "interrupted (Ctrl-C)",
}
MAX_MEMORY_MIB = 3584  # RAM is one block from 0; the PC's CMOS describes at most 3.5 GiB below 4 GiB
BIOS_LIMIT = 16 * MiB


class _Output:
    """The guest's console on standard output; remembers whether its last line is complete."""

    def __init__(self) -> None:
        self.open_line = False

    def __call__(self, data: bytes) -> None:
        if data:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            self.open_line = not data.endswith(b"\n")

    def end_line(self) -> None:
        # So the closing line on standard error starts on a line of its own on a terminal.
        if self.open_line:
            sys.stdout.buffer.write(b"\n")
            sys.stdout.buffer.flush()
            self.open_line = False


def _mib(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB") from None
    if not 2 <= value <= MAX_MEMORY_MIB:
        raise argparse.ArgumentTypeError(f"{text} MiB is outside 2..{MAX_MEMORY_MIB}")
    return value


def _backend(text: str) -> str:
    if text == "inproc" or (text.startswith("unix:") and len(text) > len("unix:")):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither inproc nor unix:PATH")


def _parser() -> CommandParser:
    parser = CommandParser(
        prog=PROG,
        description="Boot a PC on KVM: the example devices behind a real vCPU, in this process or in a "
        "service. The guest's debug console and COM1 go to standard output; the last line on standard error "
        "says why the run ended.\n\n"
        "  python -m examples.pc --bios /usr/share/seabios/bios.bin --until 'No bootable device'\n"
        "  python -m examples serve --socket /tmp/pc.sock --device examples.pc_remote_devices:pc_devices &\n"
        "  python -m examples.pc --bios /usr/share/seabios/bios.bin --backend unix:/tmp/pc.sock",
        exit_statuses=EXIT_STATUSES,
    )
    parser.add_argument(
        "--bios", metavar="PATH", required=True, type=Path, help="BIOS image (e.g. /usr/share/seabios/bios.bin)"
    )
    parser.add_argument(
        "--disk",
        metavar="PATH",
        type=Path,
        help="disk image for ATA device 0 on the primary channel (in process; a service takes PC_DISK instead)",
    )
    parser.add_argument(
        "--memory", type=_mib, default=64, metavar="MIB", help=f"RAM in MiB, 2..{MAX_MEMORY_MIB} (default 64)"
    )
    parser.add_argument(
        "--timeout",
        type=seconds(zero=True),
        default=60.0,
        metavar="SECONDS",
        help="stop after this long (0: never; default 60)",
    )
    parser.add_argument(
        "--backend",
        type=_backend,
        default="inproc",
        metavar="inproc|unix:PATH",
        help="where the devices run: in this process (default), or in the service at the UNIX socket PATH",
    )
    parser.add_argument("--until", metavar="TEXT", help="stop with status 0 once the guest has printed TEXT")
    parser.add_argument("--no-posted-writes", action="store_true", help="every OUT waits for its completion")
    return parser


def _read_bios(parser: CommandParser, path: Path) -> bytes:
    try:
        bios = path.read_bytes()
    except OSError as error:
        parser.exit(FAILED, f"{PROG}: error: cannot read the BIOS image {path}: {error.strerror or error}\n")
    if not bios or len(bios) % 0x10000 or len(bios) > BIOS_LIMIT:
        parser.exit(
            FAILED,
            f"{PROG}: error: the BIOS image {path} is {len(bios)} bytes; a BIOS image is a multiple of 64 KiB "
            "up to 16 MiB\n",
        )
    return bios


def _leaf(error: BaseException) -> BaseException:
    # An error inside a task group arrives wrapped in an exception group: the first real one.
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _closing_line(result: PcResult, until: str | None) -> tuple[str, int]:
    if result.seen:
        return f"the guest printed {until!r} (exit status {SEEN})", SEEN
    if result.exit_status is not None:
        value, status = result.exit_status >> 1, result.exit_status & 0xFF  # a process's status is one byte
        wrapped = ", mod 256" if result.exit_status > 0xFF else ""
        return (
            f"the guest wrote {value:#x} to the exit device: exit status {status} = ({value:#x} << 1) | 1{wrapped}, "
            "as with QEMU's isa-debug-exit",
            status,
        )
    if result.timed_out:
        return f"error: {result.reason} (exit status {TIMED_OUT})", TIMED_OUT
    return f"error: {result.reason} (exit status {FAILED})", FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Boot the PC the arguments describe; returns the exit status (:data:`EXIT_STATUSES`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.disk is not None and args.backend != "inproc":
        parser.error("--disk is for the in-process backend: give the service its disk as PC_DISK=PATH")
    reason = kvm_available()
    if reason is not None:
        return parser.fail(f"KVM is not usable here: {reason}", FAILED)
    bios = _read_bios(parser, args.bios)
    if args.disk is not None and not args.disk.is_file():
        return parser.fail(f"the disk image {args.disk} is not a file", FAILED)
    output = _Output()
    config = PcConfig(
        bios=bios,
        disk=str(args.disk) if args.disk is not None else None,
        memory_size=args.memory * MiB,
        timeout=args.timeout or None,
        serial_sink=output,
        debug_sink=output,
        posted_writes=not args.no_posted_writes,
        until=args.until.encode() if args.until else None,
    )
    try:
        if args.backend == "inproc":
            result = anyio.run(run_pc, config)
        else:
            from .pc_remote_vmm import run_remote_pc

            result = anyio.run(run_remote_pc, config, args.backend[len("unix:") :])
    except KeyboardInterrupt:
        output.end_line()
        return parser.fail("interrupted", INTERRUPTED)
    except BaseException as raised:
        error = _leaf(raised)
        if not isinstance(error, KvmUnavailableError | DispatchError | OSError | ValueError):
            raise
        output.end_line()
        return parser.fail(str(error), FAILED)
    output.end_line()
    line, status = _closing_line(result, args.until)
    print(f"{PROG}: {line}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
