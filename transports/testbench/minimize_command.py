"""``intercept-dispatch minimize TRACE -o OUT``: the few intercepts of a failing trace that still fail the same way.

::

    intercept-dispatch minimize crash.trace --device mymodule:build -o small.trace

The trace is replayed against the machine (``--device``, else the one the
trace names) to find how it fails: a handler raised (the exception's type
and the port), a handler hung (no answer within ``--timeout`` seconds), or
an answer differed from the one recorded (the kind and the port). Delta
debugging (:func:`dispatcher.minimize.ddmin`) then removes intercepts, each
with its completion, memory, clock and interrupt events, keeping a
candidate only if its replay fails the same way. Every candidate runs in a
child process, so a hang is stopped at the timeout. The result is written
as a trace, and the last line printed is ``minimized N intercepts to M``.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from dispatcher import DispatchError
from dispatcher.minimize import Failure, ddmin, failure_of, flatten, intercept_ports, same_failure, trace_units
from dispatcher.replay import intercept_access, replay
from dispatcher.trace import TraceWriter, new_metadata
from dispatcher.trace_records import Intercept, TraceEvent
from transports.service.command_line import CommandParser, seconds
from transports.service.devices import add_device_paths

from .replay_command import add_machine_arguments, build_machine, load_events, machine_spec

__all__ = ["DEFAULT_TIMEOUT", "EXIT_STATUSES", "Machine", "Minimized", "main", "minimize_trace", "run_candidate"]

PROG = "intercept-dispatch minimize"
DEFAULT_TIMEOUT = 5.0
EXIT_STATUSES: dict[int | str, str] = {
    0: "the minimized trace was written",
    1: "the trace does not fail, or it, the machine or the output could not be used (the line printed says why)",
}
"""The exit statuses of the command and what each means."""


class MinimizeError(DispatchError):
    """The trace cannot be minimized (it does not fail, or its replay cannot run); ``str()`` says why."""


class Machine(NamedTuple):
    """What a candidate replays against: the factory spec, its keyword arguments, the clock's first reading."""

    spec: str
    arguments: Mapping[str, Any]
    start_ns: int = 0


class Minimized(NamedTuple):
    """The failure kept, and the events that still show it."""

    failure: Failure
    events: list[TraceEvent]


def _child(
    connection: Connection, progress: Any, events: list[TraceEvent], machine: Machine, target: Failure | None
) -> None:
    # A candidate's replay, in the child: answers (failure found, same as the target).
    def note(index: int) -> None:
        progress.value = index

    try:
        made, clock = build_machine(machine.spec, machine.arguments, start_ns=machine.start_ns)
        result = replay(events, made, clock=clock, progress=note)
        found = failure_of(result)
        connection.send((found, target is not None and same_failure(result, target), None))
    except BaseException as error:  # whatever went wrong, the parent hears it rather than EOF
        connection.send((None, False, f"{type(error).__name__}: {error}"))
    finally:
        connection.close()


def run_candidate(
    events: list[TraceEvent], machine: Machine, *, timeout: float, target: Failure | None = None
) -> tuple[Failure | None, bool]:
    """Replay ``events`` in a child process: (the failure it shows or None, whether it is ``target``'s).

    A replay that gives no answer within ``timeout`` seconds is killed and
    is a "hang" at the intercept it was running. Raises
    :class:`MinimizeError` when the child reports that the replay could not
    run (an ill-formed candidate, a machine that cannot be made) and no
    ``target`` is given; with one, such a candidate simply does not match.
    """
    context = multiprocessing.get_context("fork")  # the candidate's events and machine module come along
    progress = context.RawValue("q", -1)
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(sender, progress, events, machine, target), daemon=True)
    child.start()
    sender.close()
    try:
        if receiver.poll(timeout):
            try:
                found, same, problem = receiver.recv()
            except EOFError:
                found, same, problem = None, False, f"the replay's process ended with status {child.exitcode}"
            child.join()
        else:
            child.kill()
            child.join()
            index = progress.value
            port = None
            running = events[index] if 0 <= index < len(events) else None
            if isinstance(running, Intercept):
                port = intercept_access(running.frame)[0]
            hang = Failure("hang", port, "timeout")
            return hang, target is not None and target.kind == "hang" and target.port == port
    finally:
        receiver.close()
    if problem is not None and target is None:
        raise MinimizeError(problem)
    return found, same


def minimize_trace(events: Sequence[TraceEvent], machine: Machine, *, timeout: float = DEFAULT_TIMEOUT) -> Minimized:
    """The fewest of ``events``' intercepts that fail as the whole trace does (a 1-minimal set of them).

    Raises :class:`MinimizeError` if the whole trace does not fail.
    """
    events = list(events)
    target, _ = run_candidate(events, machine, timeout=timeout)
    if target is None:
        raise MinimizeError("the trace replays without a failure: there is nothing to minimize")
    units = trace_units(events)

    def fails(candidate: list[Sequence[TraceEvent]]) -> bool:
        # A failure at a port needs an access to that port: no need to run a candidate without one.
        if target.port is not None and target.port not in intercept_ports(candidate):
            return False
        return run_candidate(flatten(candidate), machine, timeout=timeout, target=target)[1]

    return Minimized(target, flatten(ddmin(units, fails)))


def _count_intercepts(events: Sequence[TraceEvent]) -> int:
    return sum(1 for event in events if type(event) is Intercept)


def _parser() -> CommandParser:
    parser = CommandParser(
        prog=PROG,
        description="Shrink a failing trace to the fewest intercepts that still fail the same way: the same "
        "handler exception at the same port, a hang at the same port, or the same kind of difference at the "
        "same port. Each candidate is replayed in a child process, stopped after --timeout.\n\n"
        "  intercept-dispatch minimize crash.trace --device mymodule:build -o small.trace\n\n"
        "The last line printed is: minimized N intercepts to M.",
        exit_statuses=EXIT_STATUSES,
    )
    add_machine_arguments(parser)
    parser.add_argument("-o", "--output", metavar="OUT", required=True, help="where to write the minimized trace")
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=seconds(zero=False, at_most=3600),
        default=DEFAULT_TIMEOUT,
        help=f"a candidate replay running longer has hung (default {DEFAULT_TIMEOUT:g})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    add_device_paths(args.device_path)
    try:
        metadata, events = load_events(args.trace)
        spec, arguments = machine_spec(metadata, args.device)
        start = metadata.get("start_ns", 0)
        machine = Machine(spec, arguments, start if isinstance(start, int) and start >= 0 else 0)
        build_machine(machine.spec, machine.arguments, start_ns=machine.start_ns)  # its errors here, not in a child
        minimized = minimize_trace(events, machine, timeout=args.timeout)
        out_metadata = dict(metadata) if metadata else new_metadata("minimize", machine=spec, machine_args=arguments)
        out_metadata["minimized_from"] = os.path.abspath(args.trace)
        out_metadata["failure"] = str(minimized.failure)
        with TraceWriter(args.output, out_metadata) as writer:
            writer.write_all(minimized.events)
    except OSError as error:
        return parser.fail(f"{error.filename or args.trace}: {error.strerror or error}", 1)
    except (DispatchError, ValueError) as error:
        return parser.fail(str(error), 1)
    print(f"failure: {minimized.failure}")
    print(f"minimized {_count_intercepts(events)} intercepts to {_count_intercepts(minimized.events)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
