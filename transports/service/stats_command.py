"""``intercept-dispatch stats``: a running service's counts and latency, asked over its socket.

::

    intercept-dispatch stats                 # a table for people
    intercept-dispatch stats --json          # the document itself (docs/SERVICE.md lists its fields)
    intercept-dispatch stats --vm 3          # only VM 3 in the per-VM part

The service answers a control request (docs/PROTOCOL.md, "Control
requests"); nothing is read from its log. The exit statuses are
:data:`EXIT_STATUSES` (``stats --help`` lists them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from dispatcher import DispatchError

from .command_line import SOCKET_HELP, USAGE, CommandParser, describe_unreachable, seconds, socket_path
from .control import ControlError, Request, control_request

__all__ = ["ANSWERED", "EXIT_STATUSES", "INTERRUPTED", "REFUSED", "UNREACHABLE", "ask", "format_stats_text", "main"]

ANSWERED, REFUSED, UNREACHABLE, INTERRUPTED = 0, 1, 3, 130
EXIT_STATUSES = {
    ANSWERED: "the service answered (printed)",
    REFUSED: "the service refused the request, e.g. it serves no such VM (the line printed says why)",
    USAGE: "usage error (the line printed says what was wrong)",
    UNREACHABLE: "no service answered at the socket, or it broke off",
    INTERRUPTED: "interrupted (Ctrl-C)",
}
"""The exit statuses of the command and what each means."""


def _vm(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a VM id (a partition id, e.g. 0 or 0x10)") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..0xffffffffffffffff (a VM id is a 64-bit partition id)")
    return value


def add_common_options(parser: CommandParser) -> None:
    """``--socket``, ``--vm``, ``--json`` and ``--timeout``: what ``stats`` and ``inspect`` share."""
    parser.add_argument("--socket", metavar="PATH", default=None, help=SOCKET_HELP)
    parser.add_argument(
        "--vm",
        metavar="ID",
        type=_vm,
        default=None,
        help="only this VM: the partition id its VMM sends in every intercept (e.g. 0)",
    )
    parser.add_argument("--json", action="store_true", help="print the service's JSON document as it is")
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=seconds(zero=False, at_most=3600),
        default=5.0,
        help="how long to wait for the answer (default 5)",
    )


def ask(parser: CommandParser, args: argparse.Namespace, kind: Request, show: Callable[[Any], str]) -> int:
    """Send the request, print the answer (``show`` formats it, unless ``--json``); the exit status."""
    path = socket_path(parser, args.socket)
    try:
        document = anyio.run(_ask, path, kind, args.vm, args.timeout)
    except KeyboardInterrupt:
        return parser.fail("interrupted", INTERRUPTED)
    except TimeoutError:
        return parser.fail(f"the service at {path} did not answer within {args.timeout:g} s", UNREACHABLE)
    except ControlError as error:
        return parser.fail(str(error), REFUSED)
    except (OSError, ValueError) as error:
        return parser.fail(
            describe_unreachable(path, error, start=f"intercept-dispatch serve --socket {path}"), UNREACHABLE
        )
    except DispatchError as error:  # what the transport raises names the service and its path
        return parser.fail(str(error), UNREACHABLE)
    try:
        print(json.dumps(document, indent=2) if args.json else show(document))
    except BrokenPipeError:
        # Whoever read the output has gone (``stats | head``): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return ANSWERED


async def _ask(path: str, kind: Request, vm: int | None, timeout: float) -> Any:
    return await control_request(path, kind, vm=vm, timeout=timeout)


def duration(seconds: float) -> str:
    """``2 h 03 min``, ``4 min 05 s``, ``12 s``."""
    whole = int(seconds)
    if whole >= 3600:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    if whole >= 60:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{seconds:.0f} s"


def latency_text(seconds: float | None) -> str:
    """``850 ns``, ``2.5 us``, ``12 ms``, ``1.5 s``; ``-`` for no samples, ``> 10 s`` past the last bucket."""
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return "> 10 s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def histogram_percentile(latency: dict[str, Any], bounds: Sequence[float], point: float) -> float | None:
    """The upper bound of the bucket that holds the ``point`` percentile of a document's histogram."""
    samples = latency["samples"]
    if not samples:
        return None
    wanted, seen = max(1.0, point / 100 * samples), 0
    for bound, count in zip((*bounds, math.inf), latency["counts"], strict=True):
        seen += count
        if seen >= wanted:
            return bound
    return math.inf


def _device_rows(devices: list[dict[str, Any]], bounds: Sequence[float], indent: str) -> list[str]:
    width = max([len(d["name"]) for d in devices] + [6])
    rows = [f"{indent}{'DEVICE':<{width}}  {'PORTS':<18}{'CALLS':>9}{'FAILED':>8}{'TIMED':>7}  {'P50 <=':<9}P99 <="]
    for device in devices:
        latency = device["latency"]
        p50, p99 = (latency_text(histogram_percentile(latency, bounds, p)) for p in (50, 99))
        rows.append(
            f"{indent}{device['name']:<{width}}  {device['ports']:<18}{device['calls']:>9}{device['failures']:>8}"
            f"{latency['samples']:>7}  {p50:<9}{p99}"
        )
    return rows


def format_stats_text(document: dict[str, Any]) -> str:
    """The statistics document as a few lines and a table per VM, for people."""
    service, counts, connections = document["service"], document["intercepts"], document["connections"]
    deadline = service.get("deadline_seconds")
    lines = [
        f"service pid {service['pid']} on {service.get('socket', '?')}, up {duration(service['uptime_seconds'])}"
        f" ({service.get('backend', '?')}; handler deadline {f'{deadline:g} s' if deadline else 'none'})",
        f"intercepts {counts['received']} received, {counts['completed']} completed; errors: "
        f"{counts['protocol_errors']} protocol, {counts['handler_failed']} handler, "
        f"{counts['deadline_exceeded']} deadline, {counts['unsupported']} unsupported, "
        f"{counts['memory_errors']} memory; unclaimed: {counts['unclaimed_reads']} reads, "
        f"{counts['unclaimed_writes']} writes",
        f"connections {connections['open']} open, {connections['total']} total, {connections['refused']} refused; "
        f"{connections['control']} from tools (stats, inspect)",
    ]
    workers = document.get("workers")
    if workers is not None:
        silent = workers.get("unanswered_vms") or []
        lines.append(
            f"workers {workers['running']} running (one per VM), {workers['started']} started, "
            f"{workers['failed']} ended unbidden ({workers['hung']} after a hung handler)"
            + (f"; no answer from VM {', '.join(str(vm) for vm in silent)}" if silent else "")
        )
    elif service.get("isolation") == "none":
        lines.append("every VM in the service's own process (--in-process: unisolated)")
    round_trip = document["round_trip"]
    if round_trip["samples"]:
        lines.append(
            "round trip "
            + ", ".join(f"{name} {latency_text(round_trip[f'{name}_seconds'])}" for name in ("p50", "p90", "p99"))
            + f" ({round_trip['samples']} samples)"
        )
    bounds = document["latency_bounds_seconds"]
    lines += ["", "all VMs:", *_device_rows(document["devices"], bounds, "  ")]
    for vm in document["vms"]:
        lines += ["", f"VM {vm['id']}: {vm['calls']} calls, {vm['failures']} failed"]
        lines += _device_rows(vm["devices"], bounds, "  ")
    lines += [
        "",
        "calls are handler calls; TIMED is how many were timed (a sample), P50/P99 the bucket bounds they fall under",
    ]
    return "\n".join(lines)


def _parser() -> CommandParser:
    parser = CommandParser(
        prog="intercept-dispatch stats",
        description="Ask a running service for its statistics: totals, and calls and handler latency per "
        "device and per VM (a VM is a partition id).\n\n"
        "  intercept-dispatch stats --socket /tmp/dispatch.sock\n"
        "  intercept-dispatch stats --json",
        exit_statuses=EXIT_STATUSES,
    )
    add_common_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``stats`` command; returns the exit status (:data:`EXIT_STATUSES`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    return ask(parser, args, Request.STATS, format_stats_text)


if __name__ == "__main__":
    sys.exit(main())
