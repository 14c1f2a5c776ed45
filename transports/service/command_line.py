"""What every command of the project shares on its command line: one-line usage errors, listed exit statuses.

::

    parser = CommandParser(prog="intercept-dispatch poke", description="...", exit_statuses=STATUSES)

A usage error is one line on standard error, ``PROG: error: WHAT``, and
exit status 2 (argparse's own, without the usage text before it: ``--help``
shows that). ``--help`` ends with the command's exit statuses.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import stat
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

from ..socket_path import SocketPathError, default_socket_path

__all__ = [
    "SOCKET_HELP",
    "USAGE",
    "CommandParser",
    "ExitStatuses",
    "describe_unreachable",
    "exit_status_text",
    "seconds",
    "socket_path",
]

USAGE = 2
"""The exit status of a usage error (argparse's)."""
ExitStatuses: TypeAlias = Mapping[int, str] | Mapping[int | str, str]
"""Each exit status (or a text naming several) and what it means."""
_SUN_PATH = 108  # sizeof(sockaddr_un.sun_path) on Linux, the terminating NUL included
SOCKET_HELP = (
    "the service's socket (default $XDG_RUNTIME_DIR/intercept-dispatch.sock; for root without XDG_RUNTIME_DIR, "
    "/run/intercept-dispatch/intercept-dispatch.sock)"
)
"""The help of a command's ``--socket`` option: where the default is."""


def seconds(*, zero: bool, at_most: float = math.inf) -> Callable[[str], float]:
    """An argparse type for a number of seconds: more than 0 (or 0 too with ``zero``), at most ``at_most``."""
    span = ("0 or more" if zero else "more than 0") + ("" if at_most == math.inf else f", at most {at_most:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if math.isnan(value) or value < 0 or (value == 0 and not zero) or value > at_most:
            raise argparse.ArgumentTypeError(f"{text} is out of range ({span} seconds)")
        return value

    return parse


def count(text: str) -> int:
    """An argparse type for a count: a whole number, 0 or more (``10``, ``0x10``)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


class _Formatter(argparse.HelpFormatter):
    """Wraps the description's and epilog's paragraphs; keeps indented lines (examples, lists) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if any(line[:1].isspace() for line in paragraph.splitlines()) or paragraph.startswith("exit status:"):
                paragraphs.append("\n".join(indent + line for line in paragraph.splitlines()))
            else:
                paragraphs.append(
                    textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent, subsequent_indent=indent)
                )
        return "\n\n".join(paragraphs)


def _first_number(status: int | str) -> int:
    digits = re.match(r"\d+", str(status))
    return int(digits[0]) if digits else -1


def exit_status_text(statuses: ExitStatuses, *, width: int = 79) -> str:
    """The "exit status:" block ``--help`` ends with: one status (or a set, e.g. "1, 3 ... 255") a line."""
    column = max(len(str(status)) for status in statuses)
    lines = ["exit status:"]
    for status, meaning in sorted(statuses.items(), key=lambda item: _first_number(item[0])):
        lead = f"  {status!s:<{column}}  "
        lines.append(textwrap.fill(meaning, width, initial_indent=lead, subsequent_indent=" " * len(lead)))
    return "\n".join(lines)


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line and whose ``--help`` lists the exit statuses.

    ``exit_statuses`` maps each status the command returns (or a text
    naming several, "1, 3 ... 255") to what it means; :data:`USAGE` is
    added if missing.
    """

    def __init__(self, *, exit_statuses: ExitStatuses, **kwargs: Any) -> None:
        statuses: dict[int | str, str] = {status: meaning for status, meaning in exit_statuses.items()}
        statuses.setdefault(USAGE, "usage error (the line printed says what was wrong)")
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs["epilog"] = "\n\n".join(part for part in (kwargs.get("epilog"), exit_status_text(statuses)) if part)
        super().__init__(**kwargs)
        self.exit_statuses = statuses

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE`` as one line on standard error and exit with :data:`USAGE`."""
        self.exit(USAGE, f"{self.prog}: error: {' '.join(message.split())}\n")

    def fail(self, message: str, status: int) -> int:
        """Print ``PROG: error: MESSAGE`` as one line on standard error; return ``status`` (to be the exit status)."""
        print(f"{self.prog}: error: {' '.join(message.split())}", file=sys.stderr)
        return status


def socket_path(parser: CommandParser, given: str | None) -> str:
    """The socket path a command uses: ``given`` (its ``--socket``) or the default; a usage error when neither is."""
    if given is None:
        try:
            return default_socket_path()
        except SocketPathError as error:
            parser.error(f"argument --socket: {error}")
    if not given:
        parser.error("argument --socket: the path is empty")
    return given


def describe_unreachable(path: str, error: OSError | ValueError, *, start: str) -> str:
    """Why no service could be reached at the UNIX socket ``path``, in words: the path, and what is (not) there.

    ``error`` is what connecting raised; ``start`` is the command that would
    start a service there, offered when there is no socket file at all.
    """
    where = f"no service at {path}"
    if isinstance(error, ValueError):  # e.g. a NUL byte in the path
        return f"{where}: {error}"
    code = error.errno
    if code == errno.ENOENT:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            return f"{where}: the directory {directory} does not exist"
        return f"{where}: there is no such file (start a service there with: {start})"
    if code == errno.ENOTDIR:
        blocking = next((p for p in reversed(Path(path).parents) if p.exists() and not p.is_dir()), None)
        return f"{where}: {blocking or 'a part of the path'} is not a directory"
    if code == errno.EACCES:
        return f"{where}: permission denied (the socket or its directory does not let this user in)"
    if code == errno.ECONNREFUSED:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = 0
        if stat.S_ISDIR(mode):
            return f"{where}: it is a directory, not a socket"
        if not stat.S_ISSOCK(mode):
            return f"{where}: it is not a socket"
        return f"{where}: the socket file exists but no service is listening on it (a service that has stopped?)"
    if code in (errno.ENOTSOCK, errno.EPROTOTYPE):
        return f"{where}: it is not a stream socket"
    if len(os.fsencode(path)) >= _SUN_PATH:
        return f"{where}: the path is longer than a UNIX socket address allows ({_SUN_PATH - 1} bytes)"
    return f"{where}: {error.strerror or error}"
