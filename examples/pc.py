"""``python -m examples.pc --bios PATH [--disk PATH]``: boot a PC (the example devices on KVM).

``--snapshot-on TEXT FILE`` stops the PC once the guest has printed TEXT and
writes it to FILE (vCPU, memory and every device: docs/SNAPSHOT.md);
``--restore FILE`` resumes such a snapshot in this new process.

The debug console (ports 0x402 and 0xE9) and the serial port (COM1) go to
standard output as the guest writes them. Every run ends with one line on
standard error saying why, and an exit status (:data:`EXIT_STATUSES`):
the exit device's when the guest writes it (isa-debug-exit at 0x501:
``(value << 1) | 1``, as QEMU gives it), 0 once the output shows
``--until`` TEXT, 124 after ``--timeout``, 2 for an error (the vCPU
stopped, a usage error, a BIOS or service that cannot be used).
``--backend unix:PATH`` forwards every intercept to a ``python -m examples
serve`` listening at PATH with the PC's devices, guest RAM shared with it.
``--record FILE`` writes a trace of the run (docs/TRACE_FORMAT.md) that
``intercept-dispatch replay FILE`` repeats against fresh devices
(:func:`replay_machine`).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from dispatcher import Dispatcher, DispatchError, Router, Transport, restore_devices, save_devices
from transports.kvm import KvmTransport, KvmUnavailableError, kvm_available
from transports.kvm.snapshot import IncompatibleSnapshotError, Snapshot, save_snapshot
from transports.service.command_line import CommandParser, seconds

from .pc_devices import PC
from .pc_kvm import MiB, PcConfig, PcResult, ReplayPc, replay_machine, run_pc

__all__ = [
    "EXIT_STATUSES",
    "FAILED",
    "INTERRUPTED",
    "MACHINE_KIND",
    "SEEN",
    "TIMED_OUT",
    "ReplayPc",
    "main",
    "replay_machine",
]

PROG = "python -m examples.pc"
SEEN, FAILED, TIMED_OUT, INTERRUPTED = 0, 2, 124, 130
EXIT_STATUSES: dict[int | str, str] = {
    SEEN: "the guest printed the --until TEXT (or the --snapshot-on TEXT, and the snapshot was written)",
    "1, 3 ... 255": "the guest wrote VALUE to the exit device: (VALUE << 1) | 1, as QEMU's isa-debug-exit",
    FAILED: "error: a usage error, the vCPU stopped, or the BIOS, disk, KVM or service could not be used",
    TIMED_OUT: "the run reached --timeout",
    INTERRUPTED: "interrupted (Ctrl-C)",
}
MACHINE_KIND = "examples.pc"
"""The ``machine.kind`` of this PC's snapshots (docs/SNAPSHOT.md)."""
MAX_MEMORY_MIB = 3584  # RAM is one block from 0; the PC's CMOS describes at most 3.5 GiB below 4 GiB
BIOS_LIMIT = 16 * MiB


class _Output:
    """The guest's console on standard output; remembers whether its last line is complete."""

    def __init__(self) -> None:
        self.open_line = False
        self.gone = False  # the reader went away (``| head``): the machine runs on, its output is dropped

    def _write(self, data: bytes) -> None:
        if self.gone:
            return
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            self.gone = True
            # Python would report the pipe again when it flushes standard output at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def __call__(self, data: bytes) -> None:
        if data:
            self._write(data)
            self.open_line = not data.endswith(b"\n")

    def end_line(self) -> None:
        # So the closing line on standard error starts on a line of its own on a terminal.
        if self.open_line:
            self._write(b"\n")
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
        "--bios", metavar="PATH", type=Path, help="BIOS image (e.g. /usr/share/seabios/bios.bin); not with --restore"
    )
    parser.add_argument(
        "--disk",
        metavar="PATH",
        type=Path,
        help="disk image for ATA device 0 on the primary channel (in process; a service takes PC_DISK instead)",
    )
    parser.add_argument(
        "--memory", type=_mib, metavar="MIB", help=f"RAM in MiB, 2..{MAX_MEMORY_MIB} (default 64; not with --restore)"
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
    parser.add_argument(
        "--snapshot-on",
        nargs=2,
        metavar=("TEXT", "FILE"),
        help="once the guest has printed TEXT, stop it and write the whole PC to FILE (then exit status 0)",
    )
    parser.add_argument(
        "--restore",
        metavar="FILE",
        type=Path,
        help="resume the PC a --snapshot-on wrote to FILE, instead of booting one (give --disk again if it had one)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="with --restore: check the snapshot's memory against its CRC-32s as it is read (costs about a copy)",
    )
    parser.add_argument("--no-posted-writes", action="store_true", help="every OUT waits for its completion")
    parser.add_argument(
        "--record",
        metavar="FILE",
        type=Path,
        help="write a trace of every intercept and what else moved the devices to FILE (.gz: compressed), for "
        "intercept-dispatch replay FILE; the devices then run on a virtual clock that follows real time",
    )
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


class _Seen:
    """Watches what the guest prints for a text (serial and debug console together)."""

    def __init__(self, text: bytes) -> None:
        self.text = text
        self.tail = b""
        self.seen = False

    def wrap(self, sink: Callable[[bytes], object]) -> Callable[[bytes], object]:
        def watched(data: bytes) -> None:
            sink(data)
            if not self.seen:
                self.tail = (self.tail + data)[-len(self.text) - 64 :]
                self.seen = self.text in self.tail

        return watched


class _SavingDispatcher(Dispatcher):
    """Serves the PC; once its vCPU has stopped because the guest printed the text, writes the snapshot.

    The VM is still open here (:func:`~examples.pc_kvm.run_pc` closes it
    after :meth:`serve` returns) and its vCPU thread has ended.
    """

    def __init__(self, router: Router, pc: PC, seen: _Seen, path: Path, machine: dict[str, Any]) -> None:
        super().__init__(router)
        self.pc = pc
        self.seen = seen
        self.path = path
        self.machine = machine
        self.saved = False

    async def serve(
        self,
        transport: Transport,
        *,
        partition: int | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        await super().serve(transport, partition=partition, task_status=task_status)
        if self.seen.seen and isinstance(transport, KvmTransport):
            # The timers run on the event loop under the device lock: hold it so devices and CPU match.
            with self.lock:
                save_snapshot(self.path, transport.vm, machine=self.machine, devices=save_devices(self.pc.router))
            self.saved = True


class _RemoteSnapshots:
    """Snapshots of a PC whose devices run in a service: the service saves and restores them (SAVE, RESTORE)."""

    def __init__(
        self,
        socket: str,
        snapshot: Snapshot | None,
        verify: bool,
        seen: _Seen | None,
        snapshot_on: tuple[str, str] | None,
        machine: dict[str, Any],
    ) -> None:
        self.socket = socket
        self.snapshot = snapshot
        self.verify = verify
        self.seen = seen
        self.path = Path(os.path.abspath(snapshot_on[1])) if snapshot_on is not None else None
        self.machine = machine
        self.saved = False

    async def prepare(self, transport: KvmTransport) -> None:
        """Before the vCPU first runs (memory shared with the service): memory, the vCPU, the service's devices."""
        snapshot = self.snapshot
        if snapshot is None:
            return
        snapshot.load_memory(transport.vm, verify=self.verify)
        snapshot.restore_cpus(transport.vm)
        from transports.service.client import connect_service

        async with connect_service(self.socket) as client:
            await client.restore(snapshot.devices or {})

    async def finish(self, transport: KvmTransport) -> None:
        """The vCPU has stopped: if it was for the text, the service's devices (SAVE), then the VM, to the file."""
        if self.seen is None or not self.seen.seen or self.path is None:
            return
        from transports.service.client import connect_service

        async with connect_service(self.socket) as client:
            devices = await client.save()
        save_snapshot(self.path, transport.vm, machine=self.machine, devices=devices)
        self.saved = True


def _open_snapshot(parser: CommandParser, path: Path, disk: Path | None, devices: str) -> tuple[Snapshot, bytes, int]:
    # The snapshot, the BIOS image it holds and its RAM size; a snapshot of another machine is a clear error.
    snapshot = Snapshot.open(path)
    machine = snapshot.machine
    if machine.get("kind") != MACHINE_KIND:
        raise IncompatibleSnapshotError(
            f"a snapshot of {machine.get('kind')!r:.40}, not of {MACHINE_KIND}", path=str(path), field="machine.kind"
        )
    if machine.get("devices") != devices:
        where = {"inproc": "in process (--backend inproc)", "service": "in a service (--backend unix:PATH)"}
        parser.exit(FAILED, f"{PROG}: error: {path} has the devices of a PC that ran them "
                            f"{where.get(str(machine.get('devices')), '?')}: resume it the same way\n")  # fmt: skip
    if devices == "service":
        pass  # the service has its disk (PC_DISK), and its ATA state says whether it had one
    elif machine.get("disk") and disk is None:
        parser.exit(FAILED, f"{PROG}: error: {path} was taken with a disk: give --disk PATH (the same image)\n")
    if not machine.get("disk") and disk is not None:
        parser.exit(FAILED, f"{PROG}: error: {path} was taken without a disk: leave out --disk\n")
    memory_size = machine.get("memory_size")
    ram = snapshot.region("ram")
    if memory_size != ram.size:
        raise IncompatibleSnapshotError(
            f"{memory_size!r:.20} does not match the RAM slot's {ram.size:#x} bytes", path=str(path),
            field="machine.memory_size",
        )  # fmt: skip
    return snapshot, snapshot.read_region("bios"), ram.size


def _check_options(parser: CommandParser, args: argparse.Namespace) -> None:
    if (args.bios is None) == (args.restore is None):
        parser.error("give --bios PATH to boot a PC, or --restore FILE to resume one (one of them)")
    if args.restore is not None and args.memory is not None:
        parser.error("--memory is the snapshot's with --restore")
    if args.verify and args.restore is None:
        parser.error("--verify checks the snapshot --restore reads: give --restore FILE")
    if args.record is not None:
        if args.restore is not None:
            parser.error("--record starts from a fresh PC: leave out --restore")
        if args.backend != "inproc":
            parser.error("--record records devices in this process: with a service, record there (serve --record)")
    if args.snapshot_on is not None:
        if args.until is not None:
            parser.error("--snapshot-on TEXT FILE already stops the PC at TEXT: leave out --until")
        if not args.snapshot_on[0]:
            parser.error("--snapshot-on needs a TEXT that is not empty")
    if args.backend != "inproc" and (args.snapshot_on is not None or args.restore is not None):
        from .pc_remote_vmm import run_remote_pc

        if not {"prepare", "finish"} <= set(inspect.signature(run_remote_pc).parameters):
            parser.error("--snapshot-on and --restore need --backend inproc with this examples.pc_remote_vmm")


def main(argv: Sequence[str] | None = None) -> int:
    """Boot the PC the arguments describe; returns the exit status (:data:`EXIT_STATUSES`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_options(parser, args)
    if args.disk is not None and args.backend != "inproc":
        parser.error("--disk is for the in-process backend: give the service its disk as PC_DISK=PATH")
    reason = kvm_available()
    if reason is not None:
        return parser.fail(f"KVM is not usable here: {reason}", FAILED)
    if args.disk is not None and not args.disk.is_file():
        return parser.fail(f"the disk image {args.disk} is not a file", FAILED)
    snapshot: Snapshot | None = None
    devices = "inproc" if args.backend == "inproc" else "service"
    if args.restore is not None:
        try:
            snapshot, bios, memory_size = _open_snapshot(parser, args.restore, args.disk, devices)
        except DispatchError as problem:
            return parser.fail(str(problem), FAILED)
    else:
        bios = _read_bios(parser, args.bios)
        memory_size = (args.memory or 64) * MiB
    output = _Output()
    sink: Callable[[bytes], object] = output
    seen: _Seen | None = None
    until = args.until
    if args.snapshot_on is not None:
        seen = _Seen(args.snapshot_on[0].encode())
        sink = seen.wrap(output)
        until = args.snapshot_on[0]
    config = PcConfig(
        bios=bios,
        disk=str(args.disk) if args.disk is not None else None,
        memory_size=memory_size,
        timeout=args.timeout or None,
        serial_sink=sink,
        debug_sink=sink,
        posted_writes=not args.no_posted_writes,
        until=until.encode() if until else None,
        record=str(args.record) if args.record is not None else None,
        record_metadata={"bios": os.path.abspath(args.bios)} if args.bios is not None else {},
    )
    machine = {"kind": MACHINE_KIND, "memory_size": memory_size, "disk": args.disk is not None, "vcpus": 1,
               "devices": devices}  # fmt: skip
    saver: list[_SavingDispatcher] = []

    def dispatcher_for(transport: KvmTransport, pc: PC) -> Dispatcher:
        if snapshot is not None:
            # Before the vCPU first runs: memory, then the vCPU, then the devices (which drive INTR).
            snapshot.load_memory(transport.vm, verify=args.verify)
            snapshot.restore_cpus(transport.vm)
            restore_devices(pc.router, snapshot.devices, source=snapshot.path)
        if seen is None:
            return Dispatcher(pc.router)
        saver.append(_SavingDispatcher(pc.router, pc, seen, Path(os.path.abspath(args.snapshot_on[1])), machine))
        return saver[0]

    remote = _RemoteSnapshots(args.backend[len("unix:") :], snapshot, args.verify, seen, args.snapshot_on, machine)

    try:
        if args.backend == "inproc":
            result = anyio.run(lambda: run_pc(config, dispatcher_factory=dispatcher_for))
        else:
            from .pc_remote_vmm import run_remote_pc

            if snapshot is None and seen is None:
                result = anyio.run(run_remote_pc, config, remote.socket)
            else:
                hooks: Any = {"prepare": remote.prepare, "finish": remote.finish}  # the hooks: see _check_options
                result = anyio.run(lambda: run_remote_pc(config, remote.socket, **hooks))
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
    if args.snapshot_on is not None:
        text, file = args.snapshot_on
        if (saver and saver[0].saved) or remote.saved:
            print(f"{PROG}: the guest printed {text!r}: wrote a snapshot to {file} (exit status {SEEN})",
                  file=sys.stderr)  # fmt: skip
            return SEEN
        line, status = _closing_line(result, until)
        status = FAILED if status == SEEN else status
        print(f"{PROG}: error: no snapshot written: {line.removeprefix('error: ')}", file=sys.stderr)
        return status
    line, status = _closing_line(result, args.until)
    print(f"{PROG}: {line}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
