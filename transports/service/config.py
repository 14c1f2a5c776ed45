"""What ``serve`` can be told: :class:`ServiceConfig`, from a TOML file and the command line.

Every value is checked here, whichever way it came: its type, and its range
(a deadline of -1 s is refused, not taken as "none"). A bad value raises
:class:`ConfigError`, whose text names the file or option, the value and
why, on one line.
"""

from __future__ import annotations

import argparse
import math
import os
import pwd
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from dispatcher import DispatchError

from ..shared_memory import MAX_BYTES, MAX_REGIONS
from ..unix import DEFAULT_MODE
from .backends import BACKENDS
from .command_line import SOCKET_HELP, CommandParser
from .ratelimit import DEFAULT_LOG_RATE
from .sandbox import DEFAULT_ADDRESS_SPACE, DEFAULT_OPEN_FILES, SandboxLimits

__all__ = [
    "EXIT_FAILED",
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "LOG_LEVELS",
    "ConfigError",
    "ServiceConfig",
    "argument_parser",
    "config_from_arguments",
    "record_path",
]

EXIT_STOPPED, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
BACKEND_NAMES = tuple(BACKENDS)
MAX_SECONDS = 86_400.0
"""The longest deadline, grace period or statistics interval: a day."""
MAX_UID = 0xFFFF_FFFE  # (uid_t)-1 means "no user"
MAX_COUNT = 1_000_000
"""The highest connection or VM limit."""


class ConfigError(DispatchError):
    """A setting that cannot be used; ``str()`` names where it came from, the value and why."""


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """Everything ``serve`` can be told, from the command line or a TOML file."""

    devices: tuple[str, ...] = ()
    socket: str | None = None
    stdio: bool = False
    mode: int = DEFAULT_MODE
    allow_uid: frozenset[int] | None = None
    deadline: float | None = 5.0
    stats_interval: float | None = None
    grace: float = 5.0
    log_level: str = "INFO"
    log_rate: int = DEFAULT_LOG_RATE
    backend: str = "asyncio"
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    in_process: bool = False
    device_paths: tuple[str, ...] = ()
    max_connections: int = 1024
    max_connections_per_uid: int = 64
    max_vms: int = 256
    opening_timeout: float = 5.0
    max_regions: int = MAX_REGIONS
    max_guest_memory: int = MAX_BYTES
    address_space: int | None = DEFAULT_ADDRESS_SPACE
    open_files: int | None = DEFAULT_OPEN_FILES
    user: str | None = None
    seccomp: bool = True
    state_dir: str | None = None
    record: str | None = None

    def sandbox_limits(self) -> SandboxLimits:
        """What each worker process's sandbox enforces (:mod:`.sandbox`)."""
        return SandboxLimits(
            address_space=self.address_space, open_files=self.open_files, user=self.user, seccomp=self.seccomp
        )

    @classmethod
    def from_toml(cls, path: str) -> ServiceConfig:
        """Read a config file; its keys are the long option names with underscores (``allow_uid`` ...).

        Raises :class:`ConfigError` naming the file (and for a syntax error
        the line and column) when it cannot be read or a value is wrong.
        """
        try:
            with open(path, "rb") as file:
                text = file.read()
        except OSError as error:
            raise ConfigError(f"config file {path}: cannot read it: {error.strerror or error}") from None
        try:
            data = tomllib.loads(text.decode("utf-8"))
        except UnicodeDecodeError as error:
            line = text[: error.start].count(b"\n") + 1
            raise ConfigError(f"config file {path}, line {line}: not UTF-8 text") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path}, {_toml_position(str(error), text.decode('utf-8'))}") from None
        return cls(**_checked(data, source=f"config file {path}"))


def _toml_position(message: str, text: str) -> str:
    """tomllib's "What (at line L, column C)" or "What (at end of document)" as "line L, column C: what"."""
    found = re.fullmatch(r"(.*) \(at (?:line (\d+), column (\d+)|end of document)\)", message, re.DOTALL)
    if found is None:
        return message
    what, line, column = found.groups()
    if line is None:
        lines = text.split("\n")
        line, column = str(len(lines)), str(len(lines[-1]) + 1)
        what += " (the file ends there)"
    return f"line {line}, column {column}: {what[:1].lower()}{what[1:]}"


# The checks, each turning a value into what ServiceConfig holds or raising ValueError saying why.


def _seconds(low: float, *, zero: bool = False) -> Callable[[object], float]:
    def check(value: object) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a number of seconds") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{value!r} is not a number of seconds")
        seconds = float(value)
        if not math.isfinite(seconds) or not (low <= seconds <= MAX_SECONDS or (zero and seconds == 0)):
            span = f"0 or {low:g} to {MAX_SECONDS:g}" if zero and low > 0 else f"{low:g} to {MAX_SECONDS:g}"
            raise ValueError(f"{value:g} is out of range ({span} seconds)")
        return seconds

    return check


def _mode(value: object) -> int:
    # On the command line and as a TOML string the digits are octal ("0660"); a TOML integer is
    # taken as it is, so it must be written in octal there too (0o660).
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{1,3}", value.removeprefix("0o")):
        return int(value.removeprefix("0o"), 8)
    shown = f"{value:#o}" if isinstance(value, int) and not isinstance(value, bool) else repr(value)
    raise ValueError(f"{shown} is not a file mode from 000 to 777 in octal (e.g. '0660')")


def _uid(value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= MAX_UID:
            raise ValueError(f"{value} is not a user id (0 to {MAX_UID})")
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} is not a user id or name")
    try:
        return pwd.getpwnam(value.strip()).pw_uid
    except KeyError:
        raise ValueError(f"there is no user named {value.strip()!r}") from None


def _uids(value: object) -> frozenset[int]:
    items = value if isinstance(value, list | tuple) else [value]
    return frozenset(_uid(u) for item in items for u in (item.split(",") if isinstance(item, str) else [item]))


def _port(value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ValueError(f"{value!r} is not a TCP port (0 to 65535; 0 picks a free one)")
    return value


def _string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a non-empty string")
    return value


def _choice(choices: tuple[str, ...], *, upper: bool = False) -> Callable[[object], str]:
    def check(value: object) -> str:
        text = value.upper() if upper and isinstance(value, str) else value
        if text not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        assert isinstance(text, str)
        return text

    return check


def _devices(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{value!r} is not a list of MODULE:ATTR names")
    return tuple(value)


def _count(value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not a whole number")
    if not 1 <= value <= MAX_COUNT:
        raise ValueError(f"{value} is out of range (1 to {MAX_COUNT})")
    return value


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _bytes(low: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, str):
            found = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", value.lower())
            if found is None:
                raise ValueError(f"{value!r} is not a size in bytes (e.g. 68719476736, 64G or 512M)")
            value = int(found.group(1)) * _SIZE_UNITS[found.group(2)]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not a size in bytes")
        if not low <= value <= 1 << 56:
            raise ValueError(f"{value} is out of range ({low} to {1 << 56} bytes)")
        return value

    return check


def _count_from(low: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        number = _count(value) if not (isinstance(value, int | str) and str(value).strip() == "0") else 0
        if number < low:
            raise ValueError(f"{number} is out of range ({low} to {MAX_COUNT})")
        return number

    return check


def _directories(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else [value]
    paths = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"{item!r} is not a directory path")
        path = os.path.abspath(os.path.expanduser(item))
        if not os.path.isdir(path):
            raise ValueError(f"{item} is not a directory")
        paths.append(path)
    return tuple(paths)


def _state_directory(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a directory path")
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.isdir(path):
        raise ValueError(f"{value} is not a directory (create it first, mode 0700)")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{value}: this user (uid {os.getuid()}) cannot write in it")
    return path


def _record_path(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a file path")
    path = os.path.abspath(os.path.expanduser(value))
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ValueError(f"{value}: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{value}: this user (uid {os.getuid()}) cannot write in {directory}")
    return path


def record_path(base: str, vm: int, attempt: int = 0) -> str:
    """Where ``serve --record BASE`` records VM ``vm``: ``.vm<ID>`` inserted before BASE's suffix.

    ``run.trace`` gives ``run.vm3.trace`` (``run.trace.gz``: ``run.vm3.trace.gz``, compressed;
    ``run``: ``run.vm3``); a later ``attempt`` (the name was taken: a worker restarted for the VM,
    a VM made again after a RELEASE, an earlier run's file) gives ``run.vm3-2.trace``, then ``-3`` ...
    """
    directory, name = os.path.split(base)
    gz = ".gz" if name.endswith(".gz") and len(name) > 3 else ""
    name = name.removesuffix(gz)
    stem, dot, suffix = name.rpartition(".")
    if not stem:
        stem, dot, suffix = name, "", ""
    label = f"vm{vm}" if attempt == 0 else f"vm{vm}-{attempt + 1}"
    return os.path.join(directory, f"{stem}.{label}{dot}{suffix}{gz}")


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


_CHECKS: dict[str, Callable[[object], object]] = {
    "devices": _devices,
    "socket": _string,
    "stdio": _flag,
    "mode": _mode,
    "allow_uid": _uids,
    "deadline": _seconds(0.0),
    "stats_interval": _seconds(0.1, zero=True),
    "grace": _seconds(0.0),
    "log_level": _choice(LOG_LEVELS, upper=True),
    "log_rate": _count_from(0),
    "backend": _choice(BACKEND_NAMES),
    "metrics_port": _port,
    "metrics_address": _string,
    "in_process": _flag,
    "device_paths": _directories,
    "max_connections": _count,
    "max_connections_per_uid": _count,
    "max_vms": _count,
    "opening_timeout": _seconds(0.1),
    "max_regions": _count_from(0),
    "max_guest_memory": _bytes(0),
    "address_space": _bytes(1 << 26),
    "open_files": _count_from(16),
    "user": _string,
    "seccomp": _flag,
    "state_dir": _state_directory,
    "record": _record_path,
}
assert set(_CHECKS) == {f.name for f in fields(ServiceConfig)}


def _checked(data: dict[str, Any], *, source: str) -> dict[str, Any]:
    unknown = sorted(set(data) - set(_CHECKS))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_CHECKS))}")
    values = {}
    for name, value in data.items():
        try:
            values[name] = _CHECKS[name](value)
        except ValueError as error:
            raise ConfigError(f"{source}: {name}: {error}") from None
    return values


def _option(check: Callable[[object], object]) -> Callable[[str], object]:
    # argparse reports an ArgumentTypeError's text after "argument --name:".
    def convert(text: str) -> object:
        try:
            return check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


EXIT_STATUSES = {
    EXIT_STOPPED: "stopped by SIGTERM or SIGINT (or, with --stdio, at end of input) after answering "
    "the intercepts in flight",
    EXIT_FAILED: "could not start (the socket, the devices or the metrics address: the line printed says "
    "why), or stopped by a second signal without waiting",
    EXIT_USAGE: "usage error: an option, the config file or one of its values is wrong, or a package an "
    "option needs is missing (the line printed says which)",
}


def argument_parser(*, has_default_devices: bool) -> CommandParser:
    """The ``serve`` command's options; ``has_default_devices`` says whether ``--device`` may be left out."""
    parser = CommandParser(
        prog="intercept-dispatch serve",
        description="Serve device models to VMMs over a UNIX socket (or stdin/stdout).",
        exit_statuses=EXIT_STATUSES,
    )
    parser.add_argument(
        "--device",
        action="append",
        dest="devices",
        metavar="MODULE:ATTR",
        help="a Router, a device object or a factory of either; repeatable "
        + ("(default: the command's built-in device set)" if has_default_devices else "(at least one is needed)"),
    )
    parser.add_argument(
        "--device-path",
        action="append",
        dest="device_paths",
        type=_option(_directories),
        metavar="DIR",
        help="also look for --device modules in this directory (repeatable); the working directory is never searched",
    )
    parser.add_argument(
        "--state-dir",
        type=_option(_state_directory),
        metavar="DIR",
        help="keep each VM's device state here: saved to DIR/vm-<id>.json when the service stops, "
        "restored when the VM next connects",
    )
    parser.add_argument(
        "--record",
        type=_option(_record_path),
        metavar="FILE",
        help="record every VM's intercepts and completions to a trace file of its own: FILE with .vm<ID> before "
        "its suffix (run.trace: run.vm3.trace; .gz compresses); see intercept-dispatch trace dump",
    )
    parser.add_argument("--config", metavar="FILE", help="a TOML file of these settings (options given here win)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="UNIX socket to listen on (" + SOCKET_HELP.partition("(")[2])
    where.add_argument(
        "--stdio",
        action="store_true",
        default=None,
        help="serve one VMM on stdin/stdout instead (for a VMM that spawns the service)",
    )
    parser.add_argument(
        "--mode", type=_option(_mode), metavar="OCTAL", help="permissions of the socket file, 000-777 (default 0600)"
    )
    parser.add_argument(
        "--allow-uid",
        action="append",
        dest="allow_uid",
        type=_option(_uids),
        metavar="UID",
        help="accept connections only from this user id or name (SO_PEERCRED); repeatable or comma-separated",
    )
    parser.add_argument(
        "--deadline",
        type=_option(_seconds(0.0)),
        metavar="SECONDS",
        help=f"longest a handler may take, 0 to {MAX_SECONDS:g}; 0 for no limit (default 5)",
    )
    parser.add_argument(
        "--stats-interval",
        type=_option(_seconds(0.1, zero=True)),
        metavar="SECONDS",
        help=f"log a statistics line this often, 0.1 to {MAX_SECONDS:g}; 0 for never (the default)",
    )
    parser.add_argument(
        "--grace",
        type=_option(_seconds(0.0)),
        metavar="SECONDS",
        help=f"how long a stop waits for in-flight intercepts, 0 to {MAX_SECONDS:g} (default 5)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        default=None,
        help="serve every VM in this one process (unisolated: a crash or a hung handler ends every VM; "
        "for tests and embedding). By default each VM has a worker process of its own",
    )
    parser.add_argument(
        "--max-connections",
        type=_option(_count),
        metavar="N",
        help="VMM connections open at once, over every VM (default 1024)",
    )
    parser.add_argument(
        "--max-connections-per-uid",
        type=_option(_count),
        metavar="N",
        help="VMM connections open at once from one user id (default 64)",
    )
    parser.add_argument("--max-vms", type=_option(_count), metavar="N", help="VMs served at once (default 256)")
    parser.add_argument(
        "--opening-timeout",
        type=_option(_seconds(0.1)),
        metavar="SECONDS",
        help=f"how long a new connection may take to send its HELLO, 0.1 to {MAX_SECONDS:g} (default 5)",
    )
    sandbox = parser.add_argument_group("each VM's worker process (not with --in-process)")
    sandbox.add_argument(
        "--user",
        type=_option(_string),
        metavar="NAME",
        help="run the workers as this user (the service must be started as root); default: the service's user",
    )
    sandbox.add_argument(
        "--address-space",
        type=_option(_bytes(1 << 26)),
        metavar="BYTES",
        help=f"a worker's address space limit, RLIMIT_AS (e.g. 80G; default {DEFAULT_ADDRESS_SPACE >> 30}G: "
        "the guest memory it may map and 8G more)",
    )
    sandbox.add_argument(
        "--open-files",
        type=_option(_count_from(16)),
        metavar="N",
        help=f"a worker's descriptor limit, RLIMIT_NOFILE (default {DEFAULT_OPEN_FILES})",
    )
    sandbox.add_argument(
        "--no-seccomp",
        dest="seccomp",
        action="store_false",
        default=None,
        help="do not load the system-call filter (where libseccomp is not available)",
    )
    parser.add_argument(
        "--max-regions",
        type=_option(_count_from(0)),
        metavar="N",
        help=f"guest memory regions one VM may have mapped at once (default {MAX_REGIONS})",
    )
    parser.add_argument(
        "--max-guest-memory",
        type=_option(_bytes(0)),
        metavar="BYTES",
        help=f"bytes of guest memory one VM may have mapped at once (e.g. 16G; default {MAX_BYTES >> 30}G)",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "--log-level", type=_option(_choice(LOG_LEVELS, upper=True)), metavar="LEVEL", help=", ".join(LOG_LEVELS)
    )
    verbosity.add_argument(
        "-v", "--verbose", dest="log_level", action="store_const", const="DEBUG", help="log at DEBUG level"
    )
    verbosity.add_argument(
        "-q", "--quiet", dest="log_level", action="store_const", const="WARNING", help="log warnings and errors only"
    )
    parser.add_argument(
        "--log-rate",
        type=_option(_count_from(0)),
        metavar="LINES",
        help=f"log lines per second per process, beyond which a summary counts what was dropped "
        f"(0: no cap; default {DEFAULT_LOG_RATE})",
    )
    parser.add_argument(
        "--backend",
        type=_option(_choice(BACKEND_NAMES)),
        metavar="NAME",
        help=f"event loop: {', '.join(BACKEND_NAMES)} (default asyncio)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_option(_port),
        metavar="PORT",
        help="serve Prometheus metrics over HTTP on this TCP port (0: any free port, logged); "
        "needs the [metrics] extra",
    )
    parser.add_argument(
        "--metrics-address",
        type=_option(_string),
        metavar="ADDRESS",
        help="address the metrics endpoint binds (default 127.0.0.1, this machine only)",
    )
    return parser


def config_from_arguments(args: argparse.Namespace) -> ServiceConfig:
    """The settings of ``--config`` (if given) overridden by the options given on the command line.

    Raises :class:`ConfigError` for a config file that cannot be read or
    holds a bad value, and for settings that contradict each other.
    """
    config = ServiceConfig.from_toml(args.config) if args.config else ServiceConfig()
    given: dict[str, Any] = {
        name: getattr(args, name)
        for name in (
            "devices",
            "socket",
            "stdio",
            "mode",
            "deadline",
            "stats_interval",
            "grace",
            "log_level",
            "log_rate",
            "backend",
            "metrics_port",
            "metrics_address",
            "in_process",
            "max_connections",
            "max_connections_per_uid",
            "max_vms",
            "opening_timeout",
            "max_regions",
            "max_guest_memory",
            "address_space",
            "open_files",
            "user",
            "seccomp",
            "state_dir",
            "record",
        )
        if getattr(args, name) is not None
    }
    if "devices" in given:
        given["devices"] = tuple(given["devices"])
    if args.device_paths is not None:
        given["device_paths"] = tuple(path for paths in args.device_paths for path in paths)
    if args.allow_uid is not None:
        given["allow_uid"] = frozenset().union(*args.allow_uid)
    # The command line's --socket or --stdio overrides the config file's choice of either.
    if given.get("socket"):
        given["stdio"] = False
    elif given.get("stdio"):
        given["socket"] = None
    elif config.stdio and config.socket is not None:
        raise ConfigError(f"config file {args.config}: socket and stdio = true cannot both be set")
    config = replace(config, **given)
    if config.deadline == 0:
        config = replace(config, deadline=None)
    if config.stats_interval == 0:
        config = replace(config, stats_interval=None)
    if config.metrics_port is None and "metrics_address" in given:
        raise ConfigError("--metrics-address needs --metrics-port (the endpoint is off without a port)")
    if config.socket is not None:
        config = replace(config, socket=os.path.expanduser(config.socket))
    return config
