"""The device backend service: what ``intercept-dispatch serve`` runs.

A process beside the VMM that owns the device models, as vhost-user and
vfio-user daemons do. It loads devices, listens on a UNIX socket (or serves
one VMM on stdin/stdout), announces its ports on every connection and
answers intercepts. Every connection has its own engine: a malformed frame,
a desynchronised stream or a VMM killed mid-frame ends at most that
connection. The devices themselves are shared, so a VMM that reconnects
finds them as it left them. A connection whose first frame is a control
request (:mod:`.control`) is a tool asking for statistics or device state
instead. SIGTERM/SIGINT stop it gracefully, SIGUSR1 logs a statistics line.
docs/SERVICE.md is the operator's guide.
"""

from __future__ import annotations

import errno
import functools
import importlib.metadata
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import anyio
import anyio.abc

from dispatcher import Dispatcher, DispatchError, PortRange, Router, TransportError, encode_announcement

from ..fdstream import FdStreamTransport
from ..latency import LatencySamples
from ..pipe import stdio_transport
from ..shared_memory import with_shared_memory
from ..unix import UnixListener, UnixTransport, default_socket_path
from . import systemd
from .backends import BackendUnavailableError, check_backend
from .config import EXIT_FAILED, EXIT_USAGE, ConfigError, ServiceConfig, argument_parser, config_from_arguments
from .control import CONTROL_TYPES, ControlRequest, Reply, Request, Status, serve_control
from .devices import load_devices
from .exposition import MetricsUnavailableError, check_metrics
from .metrics import instrument
from .ratelimit import RateLimit, template_key
from .report import UnknownVmError, inspect_document, stats_document
from .stats import format_stats

__all__ = ["Service", "ServiceStartError", "configure_logging", "failure_kind", "main", "run"]

log = logging.getLogger("intercept_dispatch.service")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ServiceStartError(DispatchError):
    """The service cannot start; ``str()`` says why, naming the path or address."""


def _describe(ranges: Sequence[PortRange]) -> str:
    access = {1: "r", 2: "w", 3: "rw"}
    return ", ".join(f"{r.first:#x}{f'-{r.last:#x}' if r.last != r.first else ''} {access[r.access]}" for r in ranges)


def _about(name: str, error: BaseException) -> str:
    # A transport's errors already begin with the connection's name; say it once.
    text = str(error)
    return text if text.startswith(name) else f"{name}: {text}"


class Service:
    """Serves one router's devices to any number of VMM connections, and answers control requests.

    ``allow_uid``, when given, is the set of user ids whose connections are
    accepted (checked with SO_PEERCRED); ``grace`` bounds how long a stop
    waits for in-flight intercepts. The dispatcher runs a copy of the
    router whose handlers count their calls per VM and time a sample of
    them (:mod:`.metrics`); ``info`` is added to the statistics document's
    ``service`` part.
    """

    def __init__(
        self,
        router: Router,
        *,
        deadline: float | None = 5.0,
        allow_uid: frozenset[int] | None = None,
        grace: float = 5.0,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.router = router
        served, self.handlers = instrument(router)
        self.dispatcher = Dispatcher(served, deadline=deadline)
        self.allow_uid = allow_uid
        self.grace = grace
        self.info = dict(info or {})
        self.ports = router.port_ranges()
        self._announcement = encode_announcement(self.ports)
        self.latency = LatencySamples()
        self.connections_total = 0
        self.connections_refused = 0
        self.control_total = 0
        self.stopping = False
        self.forced = False
        self._started = time.monotonic()
        self._live: set[anyio.CancelScope] = set()
        self._peeking: set[anyio.CancelScope] = set()
        self._control: set[anyio.CancelScope] = set()
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

    def stats_document(self, vm: int | None = None) -> dict[str, Any]:
        """What ``intercept-dispatch stats`` shows (docs/SERVICE.md); only VM ``vm`` in its ``vms`` part if given."""
        service = {
            "pid": os.getpid(),
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "deadline_seconds": self.dispatcher.deadline,
            **self.info,
        }
        connections = {
            "open": self.connections_open,
            "total": self.connections_total,
            "refused": self.connections_refused,
            "control": self.control_total,
        }
        return stats_document(
            service=service,
            connections=connections,
            stats=self.dispatcher.stats,
            latency=self.latency,
            handlers=self.handlers,
            vm=vm,
        )

    def inspect_document(self, vm: int | None = None) -> dict[str, Any]:
        """What ``intercept-dispatch inspect`` shows: the device objects, their ports, calls and attributes."""
        return inspect_document(self.handlers, vm)

    def answer(self, request: ControlRequest) -> Reply:
        """The reply to one control request."""
        try:
            if request.kind == Request.STATS:
                document = self.stats_document(request.vm)
            elif request.kind == Request.INSPECT:
                document = self.inspect_document(request.vm)
            else:
                known = ", ".join(f"{r.value} ({r.name.lower()})" for r in Request)
                return Reply(Status.UNKNOWN_REQUEST, f"unknown control request {request.kind}; known: {known}".encode())
        except UnknownVmError as error:
            return Reply(Status.NO_SUCH_VM, str(error).encode())
        return Reply(Status.OK, json.dumps(document, separators=(",", ":")).encode())

    def stop(self) -> None:
        """Stop accepting, stop reading, finish the intercepts already received, then let :meth:`serve` return.

        Each connection still answers the frames that had reached it (see
        :meth:`FdStreamTransport.stop_reading
        <transports.fdstream.FdStreamTransport.stop_reading>`); those still
        busy after ``grace`` seconds are cancelled. Control connections are
        closed at once.
        """
        self.stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
        for scope in (*self._peeking, *self._control):
            scope.cancel()
        self.dispatcher.stop()
        deadline = anyio.current_time() + self.grace
        for scope in self._live:
            scope.deadline = min(scope.deadline, deadline)

    async def handle(self, transport: FdStreamTransport) -> None:
        """Serve one connection until it ends: the port announcement, then intercepts or control requests."""
        # A connection accepted as the service stops is still answered (the
        # dispatcher stops it reading), within the grace period.
        scope = anyio.CancelScope(deadline=anyio.current_time() + self.grace if self.stopping else math.inf)
        self._live.add(scope)
        control = False
        try:
            with scope:
                await transport.send_batch(self._announcement)
                if isinstance(transport, UnixTransport) and await self._opens_with_control(transport):
                    control = True
                    self._live.discard(scope)
                    await self._serve_control(transport)
                else:
                    self.connections_total += 1
                    log.debug("%s: connected", transport.name)
                    transport.latency = self.latency
                    await self.dispatcher.serve(with_shared_memory(transport))
        except TransportError as error:
            log.debug("%s", _about(transport.name, error))
        except Exception:
            # A bug, not a connection problem; it still must not end the service.
            log.exception("%s: failed", transport.name)
        finally:
            self._live.discard(scope)
            with anyio.CancelScope(shield=True):
                await transport.aclose()
        if control:
            log.debug("%s: control connection closed", transport.name)
        elif scope.cancelled_caught:
            log.warning("%s: closed with intercepts unanswered after the %g s grace period", transport.name, self.grace)
        else:
            log.debug("%s: closed", transport.name)

    async def _opens_with_control(self, transport: UnixTransport) -> bool:
        # Peek at the first frame's type without reading it: a VMM connection
        # then goes to the dispatcher untouched, at no cost per intercept.
        head = b""
        with anyio.CancelScope() as peeking:
            self._peeking.add(peeking)
            if self.stopping:
                peeking.cancel()
            try:
                while True:
                    try:
                        head = transport.socket.recv(4, socket.MSG_PEEK)
                    except BlockingIOError:
                        await anyio.wait_readable(transport.socket)
                        continue
                    except OSError:
                        return False  # the dispatcher's own read will meet the same error and say so
                    if len(head) == 4 or not head:
                        break
                    await anyio.sleep(0.01)  # part of a header so far: wait for the rest
            finally:
                self._peeking.discard(peeking)
        return len(head) == 4 and int.from_bytes(head, "little") in CONTROL_TYPES

    async def _serve_control(self, transport: UnixTransport) -> None:
        self.control_total += 1
        log.debug("%s: control connection", transport.name)
        with anyio.CancelScope() as scope:
            self._control.add(scope)
            if self.stopping:
                scope.cancel()
            try:
                await serve_control(transport, self.answer)
            finally:
                self._control.discard(scope)

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


def _socket_problem(path: str, error: OSError) -> str:
    """Why ``path`` cannot be listened on, in words that name the path and what to do."""
    directory = os.path.dirname(os.path.abspath(path))
    if error.errno == errno.ENOENT:
        why = f"the directory {directory} does not exist"
    elif error.errno in (errno.EACCES, errno.EPERM):
        why = f"permission denied: this user (uid {os.getuid()}) cannot create a file in {directory}"
    elif error.errno == errno.ENOTDIR:
        why = f"a part of {directory} is not a directory"
    elif error.errno == errno.EROFS:
        why = f"{directory} is on a read-only file system"
    elif error.errno is None and "too long" in str(error):
        why = f"the path is {len(os.fsencode(path))} bytes long; a UNIX socket path may have at most 107"
    else:
        why = error.strerror or str(error)
    return f"cannot listen on {path}: {why}"


def _listener(config: ServiceConfig) -> UnixListener:
    inherited = systemd.listen_fds()
    if inherited:
        if len(inherited) > 1:
            log.warning("systemd passed %d sockets; serving the first only", len(inherited))
        try:
            return UnixListener.from_fd(inherited[0])
        except (OSError, ValueError) as error:
            raise ServiceStartError(f"cannot serve the socket systemd passed: {error}") from None
    path = config.socket or default_socket_path()
    try:
        return UnixListener.bind(path, mode=config.mode)
    except OSError as error:
        raise ServiceStartError(_socket_problem(path, error)) from None


async def _metrics_listener(address: str, port: int) -> anyio.abc.Listener[anyio.abc.SocketStream]:
    try:
        return await anyio.create_tcp_listener(local_host=address, local_port=port)
    except OSError as error:
        raise ServiceStartError(f"cannot serve metrics on {address} port {port}: {error.strerror or error}") from None


def _url(listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> str:
    address = listener.extra(anyio.abc.SocketAttribute.local_address)
    assert isinstance(address, tuple)  # an IP address: (host, port) or (host, port, flow, scope)
    host, port = address[:2]
    return f"http://{f'[{host}]' if ':' in str(host) else host}:{port}/metrics"


def _version() -> str | None:
    try:
        return importlib.metadata.version("intercept-dispatch")
    except importlib.metadata.PackageNotFoundError:
        return None


async def run(config: ServiceConfig, router: Router) -> int:
    """Serve ``router`` as ``config`` says until stopped; the process exit status.

    Raises :class:`ServiceStartError` when the socket or the metrics
    endpoint cannot be opened.
    """
    listener = None if config.stdio else _listener(config)
    where = "stdin/stdout" if listener is None else (listener.path or "an inherited socket")
    info = {"socket": where, "backend": config.backend, "version": _version()}
    service = Service(router, deadline=config.deadline, allow_uid=config.allow_uid, grace=config.grace, info=info)
    metrics = None
    try:
        if config.metrics_port is not None:
            metrics = await _metrics_listener(config.metrics_address, config.metrics_port)
            log.info("metrics at %s", _url(metrics))
        log.info("serving on %s; ports claimed: %s", where, _describe(service.ports) or "none")
        async with anyio.create_task_group() as tg:
            await tg.start(service.watch_signals, tg.cancel_scope)
            if config.stats_interval:
                tg.start_soon(service.report_stats, config.stats_interval)
            if metrics is not None:
                from .exposition import serve_metrics

                tg.start_soon(serve_metrics, metrics, service.stats_document)
                metrics = None  # serve_metrics closes it
            if listener is None:
                await service.handle(stdio_transport())
            else:
                systemd.notify("READY=1")  # the socket listens already; connections queue until accepted
                await service.serve(listener)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if listener is not None:
                await listener.aclose()
            if metrics is not None:
                await metrics.aclose()
    log.info("stopped; stats: %s", service.stats_line())
    return 1 if service.forced else 0


# Which arguments of a repeated log message tell one kind of failure from another (see
# configure_logging); messages not listed are one kind per template.
_KIND_ARGUMENTS: dict[str, tuple[int, ...]] = {
    # dispatcher.port_io: "handler failed" or "deadline exceeded", the port, the handlers.
    "%s on port %#x (%s, %d bytes) by %s, partition %d, VP %d": (0, 1, 4),
    # dispatcher.engine: rejected frames, by the partition (VM) that sent them.
    "rejected a frame from partition %d, VP %#x: %s": (0,),
    # transports.shared_memory: rejected region frames, by connection.
    "%s: rejected a region frame: %s": (0,),
    "%s: cannot map guest memory: %s": (0,),
}


def failure_kind(record: logging.LogRecord) -> Hashable:
    """What makes two log records "the same kind of failure" for the rate limit."""
    picks = _KIND_ARGUMENTS.get(str(record.msg))
    if picks is None or not isinstance(record.args, tuple):
        return template_key(record)
    args = record.args
    return (record.name, record.levelno, str(record.msg), *(args[i] for i in picks if i < len(args)))


def configure_logging(level: str) -> RateLimit:
    """Log to stderr at ``level``, repeated failures rate-limited; return the limiter (to flush)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    limiter = RateLimit(handler.handle, key=failure_kind)
    handler.addFilter(limiter)
    root = logging.getLogger()
    for previous in [h for h in root.handlers if any(isinstance(f, RateLimit) for f in h.filters)]:
        root.removeHandler(previous)  # a second main() in one process replaces the first one's handler
    root.addHandler(handler)
    root.setLevel(level)
    return limiter


async def _run_logged(config: ServiceConfig, router: Router, limiter: RateLimit) -> int:
    async def flush_summaries() -> None:
        while True:
            await anyio.sleep(1)
            limiter.flush()

    failure = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(flush_summaries)
            try:
                status = await run(config, router)
            except ServiceStartError as error:
                # Raised as it is, not inside the exception group the task group would make of it.
                failure, status = error, EXIT_FAILED
            tg.cancel_scope.cancel()
    finally:
        limiter.flush(everything=True)
    if failure is not None:
        raise failure
    return status


def _run(config: ServiceConfig, router: Router, limiter: RateLimit) -> int:
    if config.backend == "uvloop":
        return anyio.run(_run_logged, config, router, limiter, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(_run_logged, config, router, limiter, backend=config.backend)


def main(argv: Sequence[str] | None = None, *, default_devices: Callable[[], Router] | None = None) -> int:
    """The ``serve`` command; returns the exit status (listed in ``--help``).

    ``default_devices`` makes the router served when neither ``--device``
    nor the config file names a device; without it, one of them must.
    """
    parser = argument_parser(has_default_devices=default_devices is not None)
    args = parser.parse_args(argv)
    try:
        config = config_from_arguments(args)
        check_backend(config.backend)
        if config.metrics_port is not None:
            check_metrics()
    except (ConfigError, BackendUnavailableError, MetricsUnavailableError) as error:
        parser.error(str(error))
    make_router: Callable[[], Router]
    if config.devices:
        make_router = functools.partial(load_devices, config.devices)
    elif default_devices is not None:
        make_router = default_devices
    else:
        return parser.fail("no devices to serve; name them with --device MODULE:ATTR", EXIT_USAGE)
    limiter = configure_logging(config.log_level)
    # --device names modules the way `python -m` would find them: from the working directory too.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        router = make_router()
    except (DispatchError, ValueError, ImportError) as error:
        return parser.fail(f"cannot load the devices: {error}", EXIT_FAILED)
    try:
        return _run(config, router, limiter)
    except ServiceStartError as error:
        return parser.fail(str(error), EXIT_FAILED)
    except (DispatchError, OSError) as error:
        return parser.fail(f"stopped: {error}", EXIT_FAILED)
