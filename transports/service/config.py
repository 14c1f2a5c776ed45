"""What ``serve`` can be told: :class:`ServiceConfig`, from a TOML file and the command line."""

from __future__ import annotations

import argparse
import pwd
import tomllib
from dataclasses import dataclass, fields, replace
from typing import Any

from ..unix import DEFAULT_MODE, default_socket_path

__all__ = ["ServiceConfig", "argument_parser", "config_from_arguments"]


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
    backend: str = "asyncio"

    @classmethod
    def from_toml(cls, path: str) -> ServiceConfig:
        """Read a config file; its keys are the long option names (``allow_uid``, ``stats_interval`` ...)."""
        with open(path, "rb") as file:
            data = tomllib.load(file)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values: dict[str, Any] = dict(data)
        if "devices" in values:
            values["devices"] = tuple(values["devices"])
        if "mode" in values and isinstance(values["mode"], str):
            values["mode"] = int(values["mode"], 8)
        if "allow_uid" in values:
            values["allow_uid"] = frozenset(_uid(u) for u in values["allow_uid"])
        return cls(**values)


def _uid(value: int | str) -> int:
    if isinstance(value, int) or value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise ValueError(f"no such user: {value!r}") from None


def _octal(text: str) -> int:
    return int(text, 8)


def argument_parser(*, has_default_devices: bool) -> argparse.ArgumentParser:
    """The ``serve`` command's options; ``has_default_devices`` says whether ``--device`` may be left out."""
    parser = argparse.ArgumentParser(
        prog="intercept-dispatch serve",
        description="Serve device models to VMMs over a UNIX socket (or stdin/stdout).",
    )
    parser.add_argument(
        "--device",
        action="append",
        dest="devices",
        metavar="MODULE:ATTR",
        help="a Router, a device object or a factory of either; repeatable "
        + ("(default: the command's built-in device set)" if has_default_devices else "(at least one is needed)"),
    )
    parser.add_argument("--config", metavar="FILE", help="a TOML file of these settings (options given here win)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help=f"UNIX socket to listen on (default {default_socket_path()})")
    where.add_argument(
        "--stdio",
        action="store_true",
        default=None,
        help="serve one VMM on stdin/stdout instead (for a VMM that spawns the service)",
    )
    parser.add_argument("--mode", type=_octal, metavar="OCTAL", help="permissions of the socket file (default 0600)")
    parser.add_argument(
        "--allow-uid",
        action="append",
        dest="allow_uid",
        metavar="UID",
        help="accept connections only from this user id or name (SO_PEERCRED); repeatable",
    )
    parser.add_argument(
        "--deadline", type=float, metavar="SECONDS", help="longest a handler may take; 0 for no limit (default 5)"
    )
    parser.add_argument("--stats-interval", type=float, metavar="SECONDS", help="log statistics this often")
    parser.add_argument(
        "--grace", type=float, metavar="SECONDS", help="how long a stop waits for in-flight intercepts (default 5)"
    )
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    parser.add_argument("--backend", choices=["asyncio", "uvloop", "trio"], help="event loop (default asyncio)")
    return parser


def config_from_arguments(args: argparse.Namespace) -> ServiceConfig:
    """The settings of ``--config`` (if given) overridden by the options given on the command line.

    Raises ``OSError``, ``ValueError`` or ``tomllib.TOMLDecodeError`` for a
    config file that cannot be read or a user that does not exist.
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
            "backend",
        )
        if getattr(args, name) is not None
    }
    if "devices" in given:
        given["devices"] = tuple(given["devices"])
    if args.allow_uid is not None:
        given["allow_uid"] = frozenset(_uid(u) for part in args.allow_uid for u in part.split(","))
    if given.get("socket"):
        given["stdio"] = False
    config = replace(config, **given)
    if config.deadline is not None and config.deadline <= 0:
        config = replace(config, deadline=None)
    return config
