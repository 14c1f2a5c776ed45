"""The ``intercept-dispatch`` command (also ``python -m examples``): demo, serve and poke.

This is the application layer: it joins the service in
:mod:`transports.service` to the bundled example devices, which ``serve``
offers when no ``--device`` is given. Each command imports what it needs
when it runs, so ``poke`` starts without loading the device models.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dispatcher import Router

__all__ = ["main", "pc_router"]

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


def _demo(argv: list[str]) -> int:
    from .demo import main as demo_main

    return demo_main()


def _serve(argv: list[str]) -> int:
    from transports.service.server import main as serve_main

    return serve_main(argv, default_devices=pc_router)


def _poke(argv: list[str]) -> int:
    from transports.service.poke import main as poke_main

    return poke_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` (default: the process's arguments) names; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="intercept-dispatch",
        description="Device models for I/O port intercepts: run the demo guest, serve the devices to VMMs "
        "over a UNIX socket, or send one port access to a running service.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="boot a guest on KVM (or a fake VP) that drives the example UART")
    demo.set_defaults(run=_demo, passthrough=False)
    # serve and poke parse their own options (see their --help), so they are passed on untouched.
    serve = commands.add_parser(
        "serve", add_help=False, help="run the device backend service (by default with the example PC's devices)"
    )
    serve.set_defaults(run=_serve, passthrough=True)
    poke = commands.add_parser("poke", add_help=False, help="send one port access to a running service")
    poke.set_defaults(run=_poke, passthrough=True)
    args, rest = parser.parse_known_args(argv)
    if rest and not args.passthrough:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    result: int = args.run(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
