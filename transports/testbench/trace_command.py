"""``intercept-dispatch trace dump FILE [--limit N]``: a trace file as text, one event a line.

The metadata comes first (``# key: value``), then each event: its index,
the devices' clock in microseconds, its kind and its fields decoded (an
intercept's VP, direction, port, size, value and RIP; a completion's status
and registers). docs/TRACE_FORMAT.md describes the file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from dispatcher.trace import TraceError, dump, read_trace
from transports.service.command_line import CommandParser, count

__all__ = ["EXIT_STATUSES", "main"]

PROG = "intercept-dispatch trace"
EXIT_STATUSES: dict[int | str, str] = {0: "the trace was printed", 1: "the file is not a readable trace"}


def _parser() -> CommandParser:
    parser = CommandParser(
        prog=PROG,
        description="Look into trace files (recorded with serve --record, python -m examples.pc --record, or the "
        "Recorder API).\n\n"
        "  intercept-dispatch trace dump run.trace --limit 50",
        exit_statuses=EXIT_STATUSES,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    dumping = commands.add_parser(
        "dump",
        help="print a trace as text, one event a line",
        description="Print a trace: its metadata, then one line per event (index, virtual time in µs, kind, "
        "decoded fields).",
        prog=f"{PROG} dump",
        exit_statuses=EXIT_STATUSES,
    )
    dumping.add_argument("file", metavar="FILE", help="a trace file (plain or gzip-compressed)")
    dumping.add_argument("--limit", type=count, metavar="N", help="print at most N events")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (:data:`EXIT_STATUSES`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        trace = read_trace(args.file)
    except TraceError as error:
        return parser.fail(str(error), 1)
    out = sys.stdout
    try:
        for line in dump(trace, limit=args.limit):
            out.write(line + "\n")
        out.flush()
    except BrokenPipeError:
        # The reader went away (``| head``): not an error; keep Python from reporting it again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
