"""``intercept-dispatch poke``: one IN or OUT against a running service, for people.

::

    intercept-dispatch poke outb 0x3FF 0x5A
    intercept-dispatch poke inb 0x3FF          # prints 0x5a
    intercept-dispatch poke ports              # the ports the service claims

Exit status: 0 when the access completed, 1 when the service answered with
an error status, 3 when no service could be reached or it broke off, 2 for
a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import anyio

from dispatcher import Completion, DispatchError, PortRange, Status

from ..unix import UnixTransport, connect_unix, default_socket_path
from .client import ServiceClient, io_intercept

__all__ = ["main"]

_SIZES = {"b": 1, "w": 2, "l": 4}
ERROR_REPLY, UNREACHABLE = 1, 3


def _number(text: str) -> int:
    return int(text, 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="intercept-dispatch poke",
        description="Send one port access to a running service and print what it answers.",
    )
    parser.add_argument("--socket", default=None, help=f"the service's socket (default {default_socket_path()})")
    parser.add_argument("--vp", type=_number, default=0, help="VP index to send as (default 0)")
    parser.add_argument("--partition", type=_number, default=0, help="partition id to send as (default 0)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the service (default 5)")
    parser.add_argument("access", choices=["inb", "inw", "inl", "outb", "outw", "outl", "ports"])
    parser.add_argument("port", nargs="?", type=_number, help="port number, e.g. 0x3F8")
    parser.add_argument("value", nargs="?", type=_number, help="value to write (OUT only)")
    return parser


def _fail(message: str, status: int) -> int:
    print(f"poke: {message}", file=sys.stderr)
    return status


async def _talk(transport: UnixTransport, args: argparse.Namespace) -> tuple[list[PortRange], Completion | None]:
    async with ServiceClient(transport, announce_timeout=args.timeout) as client:
        if args.access == "ports":
            return client.ports, None
        frame = io_intercept(
            args.port,
            _SIZES[args.access[-1]],
            write=args.access.startswith("out"),
            value=args.value or 0,
            vp=args.vp,
            partition=args.partition,
        )
        with anyio.fail_after(args.timeout):
            return client.ports, await client.exchange(frame)


async def _poke(args: argparse.Namespace, path: str) -> int:
    try:
        with anyio.fail_after(args.timeout):
            transport = await connect_unix(path)
    except (OSError, TimeoutError) as error:
        return _fail(f"no service at {path}: {getattr(error, 'strerror', None) or error}", UNREACHABLE)
    try:
        ports, completion = await _talk(transport, args)
    except TimeoutError:
        return _fail(f"the service at {path} did not answer within {args.timeout} s", UNREACHABLE)
    except DispatchError as error:
        return _fail(f"the service at {path}: {error}", UNREACHABLE)
    if completion is None:
        for r in ports:
            print(f"{r.first:#06x}-{r.last:#06x} {'r' if r.access & 1 else '-'}{'w' if r.access & 2 else '-'}")
        return 0
    if not any(r.first <= args.port <= r.last for r in ports):
        print(f"poke: note: the service does not claim port {args.port:#x}", file=sys.stderr)
    if completion.status is not Status.COMPLETED:
        return _fail(
            f"port {args.port:#x}: the service answered {completion.status.name} (detail {completion.detail:#x})",
            ERROR_REPLY,
        )
    if args.access.startswith("in"):
        size = _SIZES[args.access[-1]]
        print(f"{completion.rax & (1 << 8 * size) - 1:#0{2 + 2 * size}x}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``poke`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.access != "ports":
        if args.port is None or not 0 <= args.port <= 0xFFFF:
            parser.error("a port number 0..0xFFFF is needed")
        if args.access.startswith("out") != (args.value is not None):
            parser.error("outb/outw/outl take a value; inb/inw/inl do not")
    elif args.port is not None:
        parser.error("ports takes no arguments")
    try:
        result: int = anyio.run(_poke, args, args.socket or default_socket_path())
    except BrokenPipeError:
        # Whoever read our output has gone (``poke ports | head -1``): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return result
