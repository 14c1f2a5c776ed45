"""The device backend service: ``intercept-dispatch serve`` (also ``python -m dispatcher serve``).

A process beside the VMM that owns the device models, as vhost-user and
vfio-user daemons do. It loads devices, listens on a UNIX socket (or serves
one VMM on stdin/stdout), announces its ports on every connection and
answers intercepts. Every connection has its own engine: a malformed frame,
a desynchronised stream or a VMM killed mid-frame ends at most that
connection. The devices themselves are shared, so a VMM that reconnects
finds them as it left them. SIGTERM/SIGINT stop it gracefully, SIGUSR1 logs
a statistics line. docs/SERVICE.md is the operator's guide.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import math
import os
import pwd
import signal
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import anyio
import anyio.abc

from dispatcher import Dispatcher, DispatchError, PortRange, Router, TransportError, encode_announcement

from . import systemd
from .fdstream import FdStreamTransport
from .pipe import stdio_transport
from .shared_memory import with_shared_memory
from .stats import LatencySamples, format_stats
from .unix import DEFAULT_MODE, UnixListener, UnixTransport, default_socket_path

__all__ = ["Service", "ServiceConfig", "default_devices", "load_devices", "main", "run"]

log = logging.getLogger("dispatcher.service")


def default_devices() -> Router:
    """The embedded default device set, served when no ``--device`` is given.

    The example PC of :func:`examples.pc_devices.build_pc` without a disk: the
    PICs, PIT and port 0x61, RTC/CMOS, COM1, the i8042, port 0x92, PCI
    configuration with an i440FX host bridge, POST codes, the debug console
    and isa-debug-exit; every other port is unclaimed. What COM1 and the
    debug console print is logged line by line.
    """
    from examples.pc_devices import build_pc

    return build_pc(serial_sink=_LineLogger("COM1"), debug_sink=_LineLogger("debugcon")).router


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


def load_devices(specs: Sequence[str]) -> Router:
    """One router holding every device named by ``specs``.

    A spec is ``module:attribute`` (the attribute may be dotted) or just
    ``module``. It may name a :class:`~dispatcher.Router` (its claims are
    copied), an object whose ``router`` attribute is one (a machine
    composition), a device object or module with ``@on_port`` handlers, or a
    class or function called without arguments to make any of these. Raises
    ``ValueError`` naming the spec when it cannot be loaded, and
    :class:`~dispatcher.OverlappingClaimError` when two devices claim a port.
    """
    router = Router()
    for spec in specs:
        target = _resolve(spec)
        if inspect.isclass(target) or inspect.isfunction(target):
            try:
                target = target()
            except Exception as error:
                raise ValueError(f"device {spec!r}: calling it failed: {error!r}") from error
        target = getattr(target, "router", target)  # e.g. a machine composition holding its router
        if isinstance(target, Router):
            router.include(target)
        elif not router.include(target):
            raise ValueError(f"device {spec!r} is neither a Router nor anything with @on_port handlers")
    return router


def _resolve(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"device {spec!r}: cannot import {module_name!r}: {error}") from error
    for name in filter(None, attribute.split(".")):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise ValueError(f"device {spec!r}: {module_name} has no attribute {attribute!r}") from None
    return target


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


def _describe(ranges: Sequence[PortRange]) -> str:
    access = {1: "r", 2: "w", 3: "rw"}
    return ", ".join(f"{r.first:#x}{f'-{r.last:#x}' if r.last != r.first else ''} {access[r.access]}" for r in ranges)


class Service:
    """Serves one router's devices to any number of VMM connections.

    ``allow_uid``, when given, is the set of user ids whose connections are
    accepted (checked with SO_PEERCRED); ``grace`` bounds how long a stop
    waits for in-flight intercepts.
    """

    def __init__(
        self,
        router: Router,
        *,
        deadline: float | None = 5.0,
        allow_uid: frozenset[int] | None = None,
        grace: float = 5.0,
    ) -> None:
        self.router = router
        self.dispatcher = Dispatcher(router, deadline=deadline)
        self.allow_uid = allow_uid
        self.grace = grace
        self.ports = router.port_ranges()
        self._announcement = encode_announcement(self.ports)
        self.latency = LatencySamples()
        self.connections_total = 0
        self.connections_refused = 0
        self.stopping = False
        self.forced = False
        self._live: set[anyio.CancelScope] = set()
        self._accepting: anyio.CancelScope | None = None

    @property
    def connections_open(self) -> int:
        return len(self._live)

    def stats_line(self) -> str:
        connections = (
            f"connections {self.connections_open} open, {self.connections_total} total, "
            f"{self.connections_refused} refused"
        )
        return format_stats(self.dispatcher.stats, self.latency, extra=connections)

    def stop(self) -> None:
        """Stop accepting, stop reading, finish the intercepts already received, then let :meth:`serve` return.

        Each connection still answers the frames that had reached it (see
        :meth:`FdStreamTransport.stop_reading
        <transports.fdstream.FdStreamTransport.stop_reading>`); those still
        busy after ``grace`` seconds are cancelled.
        """
        self.stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
        self.dispatcher.stop()
        deadline = anyio.current_time() + self.grace
        for scope in self._live:
            scope.deadline = min(scope.deadline, deadline)

    async def handle(self, transport: FdStreamTransport) -> None:
        """Serve one connection until it ends: the port announcement, then intercepts."""
        # A connection accepted as the service stops is still answered (the
        # dispatcher stops it reading), within the grace period.
        scope = anyio.CancelScope(deadline=anyio.current_time() + self.grace if self.stopping else math.inf)
        self._live.add(scope)
        self.connections_total += 1
        log.info("%s: connected", transport.name)
        try:
            with scope:
                await transport.send_batch(self._announcement)
                transport.latency = self.latency
                await self.dispatcher.serve(with_shared_memory(transport))
        except TransportError as error:
            log.info("%s: %s", transport.name, error)
        except Exception:
            # A bug, not a connection problem; it still must not end the service.
            log.exception("%s: failed", transport.name)
        finally:
            self._live.discard(scope)
            with anyio.CancelScope(shield=True):
                await transport.aclose()
        if scope.cancelled_caught:
            log.warning("%s: closed with intercepts unanswered after the %g s grace period", transport.name, self.grace)
        else:
            log.info("%s: closed", transport.name)

    async def serve(
        self, listener: UnixListener, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept connections until :meth:`stop`; return once every connection has finished."""
        number = 0
        async with anyio.create_task_group() as connections:
            try:
                with anyio.CancelScope() as self._accepting:
                    task_status.started()
                    while not self.stopping:
                        try:
                            transport = await listener.accept()
                        except OSError as error:
                            # EMFILE and the like: the service lives on, and retries shortly.
                            log.error("accepting a connection failed: %s", error)
                            await anyio.sleep(0.1)
                            continue
                        number += 1
                        if self._admit(transport, number):
                            connections.start_soon(self.handle, transport)
                        else:
                            await transport.aclose()
            finally:
                with anyio.CancelScope(shield=True):
                    await listener.aclose()

    def _admit(self, transport: UnixTransport, number: int) -> bool:
        try:
            peer = transport.peer_credentials()
        except OSError as error:
            transport.name = f"connection {number}"
            log.warning("%s: refused, its peer is unknown (%s)", transport.name, error)
            return False
        transport.name = f"connection {number} (pid {peer.pid}, uid {peer.uid})"
        if self.allow_uid is not None and peer.uid not in self.allow_uid:
            self.connections_refused += 1
            log.warning("%s: refused, uid %d is not allowed", transport.name, peer.uid)
            return False
        return True

    async def watch_signals(
        self, force: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """SIGTERM/SIGINT: stop gracefully (a second one cancels ``force``); SIGUSR1: log statistics."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            task_status.started()
            async for number in signals:
                if number == signal.SIGUSR1:
                    log.info("stats: %s", self.stats_line())
                elif not self.stopping:
                    log.info(
                        "%s: stopping; finishing the intercepts in flight on %d connection(s)",
                        signal.Signals(number).name,
                        self.connections_open,
                    )
                    systemd.notify("STOPPING=1")
                    self.stop()
                else:
                    log.warning("%s again: exiting without waiting", signal.Signals(number).name)
                    self.forced = True
                    force.cancel()

    async def report_stats(self, interval: float) -> None:
        """Log a statistics line every ``interval`` seconds."""
        while True:
            await anyio.sleep(interval)
            log.info("stats: %s", self.stats_line())


def _listener(config: ServiceConfig) -> UnixListener:
    inherited = systemd.listen_fds()
    if inherited:
        if len(inherited) > 1:
            log.warning("systemd passed %d sockets; serving the first only", len(inherited))
        return UnixListener.from_fd(inherited[0])
    return UnixListener.bind(config.socket or default_socket_path(), mode=config.mode)


async def run(config: ServiceConfig, router: Router) -> int:
    """Serve ``router`` as ``config`` says until stopped; the process exit status."""
    service = Service(router, deadline=config.deadline, allow_uid=config.allow_uid, grace=config.grace)
    listener = None if config.stdio else _listener(config)
    where = "stdin/stdout" if listener is None else (listener.path or "an inherited socket")
    log.info("serving on %s; ports claimed: %s", where, _describe(service.ports) or "none")
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(service.watch_signals, tg.cancel_scope)
            if config.stats_interval:
                tg.start_soon(service.report_stats, config.stats_interval)
            if listener is None:
                await service.handle(stdio_transport())
            else:
                systemd.notify("READY=1")  # the socket listens already; connections queue until accepted
                await service.serve(listener)
            tg.cancel_scope.cancel()
    finally:
        if listener is not None:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
    log.info("stopped; stats: %s", service.stats_line())
    return 1 if service.forced else 0


def _octal(text: str) -> int:
    return int(text, 8)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="intercept-dispatch serve",
        description="Serve device models to VMMs over a UNIX socket (or stdin/stdout).",
    )
    parser.add_argument(
        "--device",
        action="append",
        dest="devices",
        metavar="MODULE:ATTR",
        help="a Router, a device object or a factory of either; repeatable (default: the bundled example devices)",
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


def _config(args: argparse.Namespace) -> ServiceConfig:
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


def _run(config: ServiceConfig, router: Router) -> int:
    if config.backend == "uvloop":
        return anyio.run(run, config, router, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(run, config, router, backend=config.backend)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``serve`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = _config(args)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as error:
        parser.error(str(error))
    logging.basicConfig(
        level=config.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # --device names modules the way `python -m` would find them: from the working directory too.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        router = load_devices(config.devices) if config.devices else default_devices()
        return _run(config, router)
    except (DispatchError, OSError, ValueError, ImportError) as error:
        log.error("%s", error)
        return 1
