"""``intercept-dispatch replay TRACE``: replay a recorded trace (or a QEMU log) against fresh devices.

::

    intercept-dispatch replay run.trace                              # the machine the trace names
    intercept-dispatch replay run.trace --device mymodule:build      # another machine
    intercept-dispatch replay qemu.log.gz --device examples.pc_devices:build_pc --allow qemu.allow.toml

TRACE is a trace file (``serve --record``, ``python -m examples.pc
--record``, the Recorder API) or QEMU's ``-trace memory_region_ops_*`` log,
told apart by their first bytes (plain or gzip). The machine comes from
``--device MODULE:ATTR`` or else from the trace's metadata (``machine`` and
``machine_args``); a factory that takes a ``clock`` keyword gets the
replay's :class:`~dispatcher.clock.VirtualClock`. The first difference is
printed with the events before it, allowed ones are counted with their
reasons, and the last line is ``replayed N intercepts, M differ``.
"""

from __future__ import annotations

import gzip
import inspect
import os
import sys
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from dispatcher import DispatchError, Router
from dispatcher.allow import AllowList, load_allow
from dispatcher.clock import VirtualClock
from dispatcher.replay import DEFAULT_CONTEXT, ReplayResult, format_divergence, replay
from dispatcher.trace import MAGIC, read_trace
from dispatcher.trace_records import TraceEvent
from transports.service.command_line import CommandParser, count
from transports.service.devices import add_device_paths, resolve

__all__ = [
    "DIFFER",
    "EXIT_STATUSES",
    "SAME",
    "MachineError",
    "add_machine_arguments",
    "build_machine",
    "load_events",
    "machine_spec",
    "main",
    "print_result",
]

PROG = "intercept-dispatch replay"
SAME, DIFFER = 0, 1
EXIT_STATUSES: dict[int | str, str] = {
    SAME: "the devices answered as the trace says (allowed differences aside)",
    DIFFER: "some answer differed, or the trace, allow file or machine could not be used (the line printed says why)",
}
"""The exit statuses of the command and what each means."""


class MachineError(DispatchError):
    """The machine to replay against cannot be made; ``str()`` names the spec."""


def load_events(path: str) -> tuple[dict[str, Any], list[TraceEvent]]:
    """A trace file's metadata and events, or a QEMU log's events (empty metadata), told apart by content.

    Raises :class:`~dispatcher.trace.TraceError`, :class:`~dispatcher.qemu_log.QemuLogError` or OSError.
    """
    with open(path, "rb") as file:
        head = file.read(len(MAGIC))
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as file:
                head = file.read(len(MAGIC))
        except (OSError, EOFError, zlib.error):
            head = b""  # a damaged gzip file: the reader below names the problem
    if head == MAGIC:
        metadata, events = read_trace(path)
        return dict(metadata), list(events)
    from dispatcher.qemu_log import read_qemu_log

    return {}, read_qemu_log(path)


def _resolve(spec: str) -> Any:
    try:
        return resolve(spec, what="machine")
    except ValueError as error:
        raise MachineError(str(error)) from None


def _takes(target: Any, name: str) -> bool:
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def build_machine(
    spec: str, arguments: Mapping[str, Any] | None = None, *, start_ns: int = 0
) -> tuple[Any, VirtualClock]:
    """Make the machine ``spec`` (``MODULE:ATTR``) names, and the virtual clock it runs on.

    A class or function is called with ``arguments`` and, if it takes one,
    ``clock=`` the new clock; a Router, or an object with a ``router``, is
    used as it is; anything else with ``@on_port`` handlers is put on a new
    router. Raises :class:`MachineError`.
    """
    clock = VirtualClock(start_ns)
    target = _resolve(spec)
    if inspect.isclass(target) or inspect.isfunction(target) or inspect.ismethod(target):
        keywords = dict(arguments or {})
        if _takes(target, "clock"):
            keywords["clock"] = clock
        try:
            made = target(**keywords)
        except Exception as error:
            raise MachineError(f"machine {spec!r}: calling it failed: {error!r}") from None
    elif arguments:
        raise MachineError(f"machine {spec!r} is not a factory, so it takes no arguments ({', '.join(arguments)})")
    else:
        made = target
    if isinstance(made, Router) or isinstance(getattr(made, "router", None), Router):
        return made, clock
    router = Router()
    if not router.include(made):
        raise MachineError(f"machine {spec!r} is neither a Router, nor has a router, nor @on_port handlers")
    return router, clock


def machine_spec(metadata: Mapping[str, Any], device: str | None) -> tuple[str, dict[str, Any]]:
    """The machine to replay against and its keyword arguments: ``--device`` or the trace's metadata."""
    named = metadata.get("machine")
    arguments = metadata.get("machine_args") or {}
    if not isinstance(arguments, dict):
        raise MachineError("the trace's machine_args is not a JSON object")
    if device is not None:
        # The trace's arguments are for the machine it names, not another one.
        return device, dict(arguments) if device == named else {}
    if not isinstance(named, str) or not named:
        raise MachineError("the trace names no machine to replay against: give --device MODULE:ATTR")
    return named, dict(arguments)


def print_result(result: ReplayResult, *, show: int = 1) -> None:
    """The first ``show`` differences with their context, the allowed ones counted by reason, the summary line."""
    for divergence in result.differences[:show]:
        print(format_divergence(divergence))
    if len(result.differences) > show:
        print(f"... and {len(result.differences) - show} more differences")
    if result.allowed:
        print(f"allowed: {len(result.allowed)} differences")
        for reason, count in Counter(d.allowed for d in result.allowed).most_common():
            print(f"  {count:>8}  {reason}")
    for failure in result.failures[:show]:
        where = "a poll, timer or acknowledge"
        if failure.port is not None:
            where = f"port {failure.port:#x} ({'write' if failure.is_write else 'read'})"
        error = f"{failure.error}: " if failure.error else ""
        print(f"device code failed at event {failure.index}, {where}: {error}{failure.message}")
    if result.not_compared:
        print(f"not compared: {result.not_compared} intercepts the trace has no completion for")
    if result.irqs_compared:
        print("interrupt edges: compared with the trace's, in order")
    print(result.summary)


def add_machine_arguments(parser: CommandParser) -> None:
    """TRACE, ``--device`` and ``--device-path``: what ``replay`` and ``minimize`` share."""
    parser.add_argument("trace", metavar="TRACE", help="a trace file or a QEMU log")
    parser.add_argument(
        "--device",
        metavar="MODULE:ATTR",
        default=None,
        help="the machine to replay against: a factory, Router or device object (default: the trace's)",
    )
    parser.add_argument(
        "--device-path",
        metavar="DIR",
        action="append",
        default=[],
        help="a directory to import --device's module from (may be repeated)",
    )


def _parser() -> CommandParser:
    parser = CommandParser(
        prog=PROG,
        description="Replay a trace against fresh devices and compare every answer with the one recorded. "
        "TRACE is a trace file or QEMU's -trace memory_region_ops_* log (plain or gzip). The machine is "
        "--device's, else the one the trace's metadata names; a factory taking a clock keyword runs on the "
        "replay's virtual clock.\n\n"
        "  intercept-dispatch replay run.trace\n"
        "  intercept-dispatch replay qemu.log.gz --device examples.pc_devices:build_pc --allow known.toml\n\n"
        "The last line printed is: replayed N intercepts, M differ.",
        exit_statuses=EXIT_STATUSES,
    )
    add_machine_arguments(parser)
    parser.add_argument(
        "--allow", metavar="FILE", default=None, help="a TOML allow file: differences accepted, each with a reason"
    )
    parser.add_argument(
        "--context",
        metavar="N",
        type=count,
        default=DEFAULT_CONTEXT,
        help=f"events shown before a difference (default {DEFAULT_CONTEXT})",
    )
    parser.add_argument(
        "--show", metavar="N", type=count, default=1, help="differences printed in full (default 1, the first)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    add_device_paths(args.device_path)
    try:
        allow = load_allow(args.allow) if args.allow is not None else AllowList()
        metadata, events = load_events(args.trace)
        spec, arguments = machine_spec(metadata, args.device)
        machine, clock = build_machine(spec, arguments, start_ns=_start(metadata))
        result = replay(events, machine, allow=allow, clock=clock, context=args.context)
    except OSError as error:
        return parser.fail(f"{error.filename or args.trace}: {error.strerror or error}", DIFFER)
    except (DispatchError, ValueError) as error:
        return parser.fail(str(error), DIFFER)
    try:
        print_result(result, show=args.show)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return SAME if result.ok else DIFFER


def _start(metadata: Mapping[str, Any]) -> int:
    start = metadata.get("start_ns", 0)
    return start if isinstance(start, int) and start >= 0 else 0


if __name__ == "__main__":
    sys.exit(main())
