"""The device backend service: what ``intercept-dispatch serve`` runs.

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

import functools
import logging
import math
import os
import signal
import sys
import tomllib
from collections.abc import Callable, Sequence

import anyio
import anyio.abc

from dispatcher import Dispatcher, DispatchError, PortRange, Router, TransportError, encode_announcement

from ..fdstream import FdStreamTransport
from ..latency import LatencySamples
from ..pipe import stdio_transport
from ..shared_memory import with_shared_memory
from ..unix import UnixListener, UnixTransport, default_socket_path
from . import systemd
from .config import ServiceConfig, argument_parser, config_from_arguments
from .devices import load_devices
from .stats import format_stats

__all__ = ["Service", "main", "run"]

log = logging.getLogger("intercept_dispatch.service")


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


def _run(config: ServiceConfig, router: Router) -> int:
    if config.backend == "uvloop":
        return anyio.run(run, config, router, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(run, config, router, backend=config.backend)


def main(argv: Sequence[str] | None = None, *, default_devices: Callable[[], Router] | None = None) -> int:
    """The ``serve`` command; returns the exit status.

    ``default_devices`` makes the router served when neither ``--device``
    nor the config file names a device; without it, one of them must.
    """
    parser = argument_parser(has_default_devices=default_devices is not None)
    args = parser.parse_args(argv)
    try:
        config = config_from_arguments(args)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as error:
        parser.error(str(error))
    make_router: Callable[[], Router]
    if config.devices:
        make_router = functools.partial(load_devices, config.devices)
    elif default_devices is not None:
        make_router = default_devices
    else:
        print(f"{parser.prog}: error: no devices to serve; name them with --device MODULE:ATTR", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # --device names modules the way `python -m` would find them: from the working directory too.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return _run(config, make_router())
    except (DispatchError, OSError, ValueError, ImportError) as error:
        log.error("%s", error)
        return 1
