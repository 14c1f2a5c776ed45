"""``intercept-dispatch poke``: one IN or OUT against a running service, for people.

::

    intercept-dispatch poke outb 0x3FF 0x5A
    intercept-dispatch poke inb 0x3FF          # prints 0x5a
    intercept-dispatch poke ports              # the ports the service claims
    intercept-dispatch poke --vm 3 save vm3.json
    intercept-dispatch poke --vm 3 restore vm3.json

It connects as VM ``--vm`` (the partition of its frames), opening with a
HELLO as every VMM does, and talks only to a service run by this user,
root, or a ``--server-uid``. Every error is one line on standard error
naming what was wrong; the exit statuses are :data:`EXIT_STATUSES`
(``poke --help`` lists them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

import anyio

from dispatcher import Completion, DispatchError, PortRange, Status
from dispatcher.errors import IncompatibleVersionError, SessionRefusedError
from dispatcher.lifecycle import MAX_DOCUMENT, LifecycleError, Verb

from ..socket_path import ServerIdentityError, allowed_server_uids, check_server
from ..unix import UnixTransport, connect_unix
from .client import ServiceClient, io_intercept
from .command_line import SOCKET_HELP, USAGE, CommandParser, describe_unreachable, seconds, socket_path

__all__ = [
    "COMPLETED",
    "ERROR_REPLY",
    "EXIT_STATUSES",
    "FILE_ERROR",
    "INTERRUPTED",
    "REFUSED",
    "UNREACHABLE",
    "USAGE",
    "main",
]

PROG = "intercept-dispatch poke"
COMPLETED, ERROR_REPLY, UNREACHABLE, REFUSED, FILE_ERROR, INTERRUPTED = 0, 1, 3, 4, 5, 130
EXIT_STATUSES = {
    COMPLETED: "the access (or the lifecycle verb) completed (an IN printed the value read)",
    ERROR_REPLY: "the service answered with an error status, or refused the verb (its reason printed)",
    USAGE: "usage error (the line printed says what was wrong)",
    UNREACHABLE: "no service answered at the socket, or it broke off",
    REFUSED: "the service refused this VM (its reason printed) or speaks another session version, "
    "or the socket is served by a user not trusted (see --server-uid)",
    FILE_ERROR: "the state FILE of save or restore cannot be written or read (the line printed says why)",
    INTERRUPTED: "interrupted (Ctrl-C)",
}
"""The exit statuses of ``poke`` and what each means."""

_SIZES = {"b": 1, "w": 2, "l": 4}
_VERBS = {verb.name.lower(): verb for verb in Verb}
_WITH_FILE = ("save", "restore")
_WIDTH_NAMES = {1: "one byte", 2: "16 bits", 4: "32 bits"}
_STATUS_MEANING = {
    Status.HANDLER_FAILED: "the device's handler raised an error (the service's log says which)",
    Status.DEADLINE_EXCEEDED: "the device's handler ran past the service's deadline",
    Status.PROTOCOL_ERROR: "the service could not read the intercept",
    Status.UNSUPPORTED: "the service does not support this access",
    Status.MEMORY_ERROR: "guest memory the access needs could not be reached",
}


def _parse_number(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (write e.g. 0x3F8, 1016, 0o1770 or 0b1)") from None


def _bounded(what: str, bits: int) -> Callable[[str], int]:
    """A type function for argparse: a number in 0..2**bits-1, its errors saying what the number is."""
    limit = (1 << bits) - 1

    def number(text: str) -> int:
        value = _parse_number(text)
        if not 0 <= value <= limit:
            raise argparse.ArgumentTypeError(f"{text} is outside 0..{limit:#x} ({what} is {bits} bits)")
        return value

    return number


def _parser() -> CommandParser:
    parser = CommandParser(
        prog=PROG,
        description="Send one port access to a running service and print what it answers.\n\n"
        "  intercept-dispatch poke outb 0x3FF 0x5A\n"
        "  intercept-dispatch poke inb 0x3FF          # prints 0x5a\n"
        "  intercept-dispatch poke ports              # the ports the service claims\n"
        "  intercept-dispatch poke --vm 3 save vm3.json    # the VM's device state\n"
        "  intercept-dispatch poke --vm 3 restore vm3.json",
        exit_statuses=EXIT_STATUSES,
    )
    parser.add_argument("--socket", metavar="PATH", default=None, help=SOCKET_HELP)
    parser.add_argument(
        "--vp",
        metavar="N",
        type=_bounded("a VP index", 32),
        default=0,
        help="VP index to send as, 0..0xFFFFFFFF (default 0)",
    )
    parser.add_argument(
        "--vm",
        "--partition",
        dest="vm",
        metavar="ID",
        type=_bounded("a VM id", 64),
        default=0,
        help="the VM to connect as: the partition id of the frames, 64 bits (default 0)",
    )
    parser.add_argument(
        "--server-uid",
        metavar="UID",
        type=_bounded("a user id", 32),
        action="append",
        default=[],
        help="also trust a service run by this user id (repeatable); by default only this user's and root's",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=seconds(zero=False),
        default=5.0,
        help="how long to wait for the service, each step (default 5)",
    )
    parser.add_argument(
        "access",
        metavar="ACCESS",
        choices=["inb", "inw", "inl", "outb", "outw", "outl", "ports", *_VERBS],
        help="inb, inw, inl: read 1, 2 or 4 bytes and print them; outb, outw, outl: write VALUE; "
        "ports: list the ports the service claims; reset: the VM's devices to their power-on state; "
        "pause, resume: hold the VM's intercepts back, let them go; save FILE: write the VM's device state "
        "to FILE ('-': standard output); restore FILE: replace it with FILE's; release: drop the VM's devices",
    )
    parser.add_argument(
        "port", metavar="PORT", nargs="?", help="port number 0..0xFFFF, e.g. 0x3F8 (save and restore: the FILE)"
    )
    parser.add_argument(
        "value", metavar="VALUE", nargs="?", help="the value to write (OUT only): 0..0xFF, 0..0xFFFF or 0..0xFFFFFFFF"
    )
    return parser


def _check(parser: CommandParser, args: argparse.Namespace) -> None:
    """The rules argparse cannot express: what each ACCESS takes, and the value against the access width."""
    if args.access in _VERBS:
        if args.access in _WITH_FILE:
            if args.port is None:
                parser.error(f"{args.access} needs a FILE, e.g. {args.access} vm{args.vm}.json")
            if args.value is not None:
                parser.error(f"{args.access} takes one FILE (got also {args.value!r})")
        elif args.port is not None:
            parser.error(f"{args.access} takes no argument (got {args.port!r})")
        return
    if args.port is not None:
        try:
            args.port = _bounded("a port number", 16)(args.port)
        except argparse.ArgumentTypeError as error:
            parser.error(f"argument PORT: {error}")
    if args.access == "ports":
        if args.port is not None:
            parser.error(f"ports takes no PORT (got {args.port:#x})")
        return
    if args.port is None:
        parser.error(f"{args.access} needs a PORT, e.g. {args.access} 0x3F8{' 0x41' if args.access[0] == 'o' else ''}")
    size = _SIZES[args.access[-1]]
    if args.access.startswith("in"):
        if args.value is not None:
            parser.error(f"{args.access} takes no VALUE (it reads; got {args.value!r})")
        return
    if args.value is None:
        parser.error(f"{args.access} needs a VALUE to write: {args.access} {args.port:#x} VALUE")
    try:
        value = _parse_number(args.value)
    except argparse.ArgumentTypeError as error:
        parser.error(f"argument VALUE: {error}")
    limit = (1 << 8 * size) - 1
    if not 0 <= value <= limit:
        parser.error(
            f"argument VALUE: {args.value} does not fit {args.access}: it writes {_WIDTH_NAMES[size]}, 0..{limit:#x}"
        )
    args.value = value


def _leaf(error: BaseException) -> BaseException:
    # Errors from inside the client's task group arrive wrapped in an exception group: the first real one.
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


async def _talk(
    transport: UnixTransport, args: argparse.Namespace, where: str
) -> tuple[list[PortRange], Completion | None]:
    check_server(transport.socket, allowed_server_uids(args.server_uid), path=args.socket)
    async with ServiceClient(transport, vm=args.vm, announce_timeout=args.timeout, name=where) as client:
        if args.access == "ports":
            return client.ports, None
        if args.access in _VERBS:
            with anyio.fail_after(args.timeout):
                if args.access == "save":
                    args.saved = await client.save()
                elif args.access == "restore":
                    await client.restore(args.document)
                else:
                    await client.request(_VERBS[args.access])
            return client.ports, None
        frame = io_intercept(
            args.port,
            _SIZES[args.access[-1]],
            write=args.access.startswith("out"),
            value=args.value or 0,
            vp=args.vp,
            partition=args.vm,
        )
        with anyio.fail_after(args.timeout):
            return client.ports, await client.exchange(frame)


def _ports_text(ports: list[int]) -> str:
    if len(ports) == 1:
        return f"port {ports[0]:#x}"
    if ports[-1] - ports[0] == len(ports) - 1:
        return f"ports {ports[0]:#x}-{ports[-1]:#x}"
    return "ports " + ", ".join(f"{port:#x}" for port in ports)


def unclaimed_note(ports: Sequence[PortRange], port: int, size: int, *, write: bool) -> str | None:
    """What to tell the user when the ports an access covers (``port..port+size-1``) are not all claimed.

    None when every one of them is claimed in the access's direction.
    """
    flag = 2 if write else 1
    covered = list(range(port, port + size))
    missing = [p for p in covered if not any(r.first <= p <= r.last and r.access & flag for r in ports)]
    if not missing:
        return None
    direction = "writes" if write else "reads"
    if len(missing) == size:
        what = _ports_text(missing) if size == 1 else f"any of {_ports_text(missing)}"
        effect = "the write was dropped" if write else "unclaimed ports read as 0xff"
        return f"the service does not claim {what} for {direction} ({effect})"
    bytes_word = "that byte" if len(missing) == 1 else "those bytes"
    effect = (
        f"{bytes_word} {'were' if len(missing) > 1 else 'was'} dropped"
        if write
        else f"{bytes_word} read{'' if len(missing) > 1 else 's'} as 0xff"
    )
    return (
        f"the service does not claim {_ports_text(missing)} for {direction}, part of this {size}-byte access "
        f"to {_ports_text(covered)} ({effect})"
    )


def _about(where: str, error: BaseException) -> str:
    # The client's errors begin with the service's name (or, for an impostor, the socket's): say it once.
    text = str(error)
    return text if text.startswith((where, "the socket ")) else f"{where}: {text}"


def _read_document(path: str) -> bytes:
    """The state document ``restore`` sends: FILE's bytes (``-``: standard input)."""
    if path == "-":
        data = sys.stdin.buffer.read(MAX_DOCUMENT + 1)
    else:
        with open(path, "rb") as file:
            data = file.read(MAX_DOCUMENT + 1)
    if len(data) > MAX_DOCUMENT:
        raise ValueError(f"it is longer than the {MAX_DOCUMENT} bytes a RESTORE carries")
    return data


def _write_document(path: str, document: dict[str, object]) -> None:
    text = json.dumps(document, indent=1, sort_keys=True) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)


async def _poke(parser: CommandParser, args: argparse.Namespace) -> int:
    path = args.socket
    where = f"the service at {path}"
    if args.access == "restore":
        try:
            args.document = _read_document(args.port)
        except (OSError, ValueError) as error:
            return parser.fail(f"restore {args.port}: cannot read it: {getattr(error, 'strerror', None) or error}",
                               FILE_ERROR)  # fmt: skip
    try:
        with anyio.fail_after(args.timeout):
            transport = await connect_unix(path, name=where)
    except TimeoutError:
        return parser.fail(f"{where} did not accept the connection within {args.timeout:g} s", UNREACHABLE)
    except (OSError, ValueError) as error:
        return parser.fail(
            describe_unreachable(path, error, start=f"intercept-dispatch serve --socket {path}"), UNREACHABLE
        )
    failure: BaseException | None = None
    try:
        ports, completion = await _talk(transport, args, where)
    except BaseException as raised:
        failure = _leaf(raised)
        if not isinstance(failure, TimeoutError | DispatchError | OSError):
            raise
    finally:
        await transport.aclose()
    if isinstance(failure, TimeoutError):
        return parser.fail(f"{where} did not answer within {args.timeout:g} s", UNREACHABLE)
    if isinstance(failure, SessionRefusedError | IncompatibleVersionError | ServerIdentityError):
        return parser.fail(_about(where, failure), REFUSED)
    if isinstance(failure, LifecycleError):
        subject = f"{args.access} {args.port}" if args.access in _WITH_FILE else args.access
        return parser.fail(f"{subject}: {_about(where, failure)}", ERROR_REPLY)
    if failure is not None:
        return parser.fail(_about(where, failure), UNREACHABLE)
    if args.access == "save":
        try:
            _write_document(args.port, args.saved)
        except OSError as error:
            return parser.fail(f"save {args.port}: cannot write it: {error.strerror or error}", FILE_ERROR)
        return COMPLETED
    if args.access in _VERBS:
        return COMPLETED
    if completion is None:
        for r in ports:
            print(f"{r.first:#06x}-{r.last:#06x} {'r' if r.access & 1 else '-'}{'w' if r.access & 2 else '-'}")
        return COMPLETED
    if completion.status is not Status.COMPLETED:
        meaning = _STATUS_MEANING.get(completion.status, "")
        return parser.fail(
            f"{args.access} {args.port:#x}: the service answered {completion.status.name} "
            f"(detail {completion.detail:#x}){f': {meaning}' if meaning else ''}",
            ERROR_REPLY,
        )
    size = _SIZES[args.access[-1]]
    # A completed access may still have reached no device, or only some of its bytes did: say so (on stderr).
    note = unclaimed_note(ports, args.port, size, write=args.access.startswith("out"))
    if note is not None:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    if args.access.startswith("in"):
        print(f"{completion.rax & (1 << 8 * size) - 1:#0{2 + 2 * size}x}")
    return COMPLETED


def main(argv: Sequence[str] | None = None) -> int:
    """The ``poke`` command; returns the exit status (:data:`EXIT_STATUSES`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    args.socket = socket_path(parser, args.socket)
    try:
        result: int = anyio.run(_poke, parser, args)
    except BrokenPipeError:
        # Whoever read our output has gone (``poke ports | head -1``): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return COMPLETED
    except KeyboardInterrupt:
        return parser.fail("interrupted", INTERRUPTED)
    return result
