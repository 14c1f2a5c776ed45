"""The ``intercept-dispatch`` command (also ``python -m examples``): demo, serve, poke, stats, inspect, trace,
replay and minimize.

This is the application layer: it joins the service in
:mod:`transports.service` to the bundled example devices, which ``serve``
offers when no ``--device`` is given (:data:`DEFAULT_DEVICES`, a spec each
VM's worker process loads by name). Each command imports what it needs
when it runs, so ``poke`` starts without loading the device models.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dispatcher import Router
from transports.service.command_line import CommandParser

__all__ = ["COMMAND_STATUSES", "DEFAULT_DEVICES", "DEMO_STATUSES", "main", "pc_router"]

log = logging.getLogger("intercept_dispatch.service")


class _LineLogger:
    """A UART sink that logs whole lines of output."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.line = bytearray()

    def __call__(self, data: bytes) -> None:
        for byte in data:
            if byte == 0x0A:
                log.info("%s: %s", self.name, self.line.decode(errors="replace").rstrip("\r"))
                self.line.clear()
            else:
                self.line.append(byte)


def pc_router() -> Router:
    """The device set ``serve`` offers when no ``--device`` is given.

    The example PC of :func:`examples.pc_devices.build_pc` without a disk: the
    PICs, PIT and port 0x61, RTC/CMOS, COM1, the i8042, port 0x92, PCI
    configuration with an i440FX host bridge, POST codes, the debug console
    and isa-debug-exit; every other port is unclaimed. What COM1 and the
    debug console print is logged line by line.
    """
    from .pc_devices import build_pc

    return build_pc(serial_sink=_LineLogger("COM1"), debug_sink=_LineLogger("debugcon")).router


DEFAULT_DEVICES = ("examples.cli:pc_router",)
"""The devices ``serve`` offers without ``--device``: :func:`pc_router`, made once per VM."""

DEMO_STATUSES = {
    0: "the demo passed: the guest's output and every check were as expected",
    1: "a check failed, or the demo could not run (the line printed says why)",
    130: "interrupted (Ctrl-C)",
}
COMMAND_STATUSES = {
    0: "the command succeeded",
    1: "the command failed (each command's --help lists its own statuses)",
}


class _Version(argparse.Action):
    """``--version``: read from the package metadata only when asked (importlib.metadata is slow to import)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the installed version and exit", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        import dispatcher

        print(f"{parser.prog} {dispatcher.__version__}")
        parser.exit()


def _demo(argv: list[str]) -> int:
    from dispatcher import DispatchError

    from .demo import main as demo_main

    try:
        return demo_main()
    except (DispatchError, OSError) as error:
        print(f"intercept-dispatch demo: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("intercept-dispatch demo: interrupted", file=sys.stderr)
        return 130


def _serve(argv: list[str]) -> int:
    from transports.service.server import main as serve_main

    return serve_main(argv, default_devices=DEFAULT_DEVICES)


def _poke(argv: list[str]) -> int:
    from transports.service.poke import main as poke_main

    return poke_main(argv)


def _stats(argv: list[str]) -> int:
    from transports.service.stats_command import main as stats_main

    return stats_main(argv)


def _inspect(argv: list[str]) -> int:
    from transports.service.inspect_command import main as inspect_main

    return inspect_main(argv)


def _trace(argv: list[str]) -> int:
    from transports.testbench.trace_command import main as trace_main

    return trace_main(argv)


def _replay(argv: list[str]) -> int:
    from transports.testbench.replay_command import main as replay_main

    return replay_main(argv)


def _minimize(argv: list[str]) -> int:
    from transports.testbench.minimize_command import main as minimize_main

    return minimize_main(argv)


# The commands that parse their own options (see their --help): their arguments are passed on untouched.
_SERVICE_COMMANDS: tuple[tuple[str, str, Callable[[list[str]], int]], ...] = (
    ("serve", "run the device backend service (by default with the example PC's devices)", _serve),
    ("poke", "send one port access to a running service", _poke),
    ("stats", "a running service's counts and latency, per device and VM", _stats),
    ("inspect", "a running service's devices and their registers", _inspect),
    ("trace", "look into a recorded trace file (trace dump FILE)", _trace),
    ("replay", "replay a trace or QEMU log against fresh devices and compare every answer", _replay),
    ("minimize", "shrink a failing trace to the few intercepts that still fail the same way", _minimize),
)


def _parser() -> CommandParser:
    parser = CommandParser(
        prog="intercept-dispatch",
        description="Device models for I/O port intercepts: run the demo guest, serve the devices to VMMs "
        "over a UNIX socket, send one port access to a running service, ask it for its statistics and "
        "devices, or replay and minimize recorded traces.\n\n"
        "  intercept-dispatch demo\n"
        "  intercept-dispatch serve --socket /tmp/dispatch.sock\n"
        "  intercept-dispatch poke --socket /tmp/dispatch.sock inb 0x60\n"
        "  intercept-dispatch stats --socket /tmp/dispatch.sock\n"
        "  intercept-dispatch inspect --socket /tmp/dispatch.sock\n"
        "  intercept-dispatch replay run.trace\n\n"
        "Each command has its own --help.",
        exit_statuses=COMMAND_STATUSES,
    )
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="boot a guest on KVM (or a fake VP) that drives the example UART",
        description="Boot a small real-mode guest on a KVM vCPU; every port access it makes goes through the "
        "dispatcher to the example 16550 UART, which prints what the guest wrote. Where /dev/kvm cannot be "
        "opened, say why and drive the same UART from a fake VP instead.",
        exit_statuses=DEMO_STATUSES,
    )
    demo.set_defaults(run=_demo, passthrough=False, parser=demo)
    for name, summary, run in _SERVICE_COMMANDS:
        command = commands.add_parser(name, add_help=False, help=f"{summary}; see {name} --help", exit_statuses={})
        command.set_defaults(run=run, passthrough=True, parser=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` (default: the process's arguments) names; returns the exit status."""
    args, rest = _parser().parse_known_args(argv)
    if rest and not args.passthrough:
        args.parser.error(f"unrecognized arguments: {' '.join(rest)}")
    result: int = args.run(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
