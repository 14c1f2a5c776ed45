"""The device backend service: what ``intercept-dispatch serve`` runs.

A process beside the VMM that owns the device models, as vhost-user and
vfio-user daemons do. It listens on a UNIX socket (or serves one VMM on
stdin/stdout); every VMM connection opens with a HELLO naming its VM (a
partition), then gets the port announcement and is answered intercept by
intercept. Every VM has devices of its own: each ``--device`` factory is
called once per VM, so two VMs never share device state.

By default each VM runs in a worker process of its own, started by a
supervisor (:mod:`.supervisor`) on the VM's first connection: a crash, a
hung handler or a guest that corrupts its device model ends that VM only.
``--in-process`` serves every VM in this one process instead (:class:`Service`:
unisolated, for tests and embedding). A connection whose first frame is a
control request (:mod:`.control`) is a tool asking for statistics or device
state instead. SIGTERM/SIGINT stop it gracefully, SIGUSR1 logs a statistics
line. docs/SERVICE.md is the operator's guide.
"""

from __future__ import annotations

import errno
import importlib.metadata
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import anyio
import anyio.abc

from dispatcher import DispatchError, Router
from dispatcher.hello import Hello, HelloStatus
from dispatcher.recorder import Recorder

from ..fdstream import FdStreamTransport
from ..pipe import stdio_transport
from ..shared_memory import MAX_BYTES, MAX_REGIONS
from ..socket_path import ROOT_SOCKET_DIRECTORY, SocketPathError, check_bind_directory, default_socket_path
from ..unix import UnixListener
from . import systemd
from .backends import BackendUnavailableError, check_backend
from .config import EXIT_FAILED, EXIT_USAGE, ConfigError, ServiceConfig, argument_parser, config_from_arguments
from .devices import DeviceLoader, add_device_paths
from .exposition import MetricsUnavailableError, check_metrics
from .opening import OpeningError, read_opening, refuse
from .ratelimit import RateLimit
from .report import merge_inspect, merge_stats
from .sandbox import SandboxError, check_sandbox
from .stats import format_document
from .supervisor import (
    Front,
    Limits,
    Supervisor,
    WorkerSettings,
    check_devices,
    read_state_file,
    remove_state_file,
    state_path,
    write_state_file,
)
from .worker import (
    LOG_FORMAT,
    SERVICE_CAPABILITIES,
    StateFileError,
    VmDevices,
    configure_logging,
    describe_ports,
    failure_kind,
    open_recording,
)

__all__ = ["LOG_FORMAT", "Service", "ServiceStartError", "configure_logging", "failure_kind", "main", "run"]

log = logging.getLogger("intercept_dispatch.service")


class ServiceStartError(DispatchError):
    """The service cannot start; ``str()`` says why, naming the path or address."""


class Service(Front):
    """Serves every VM in this process (``serve --in-process``): one router and dispatcher per VM.

    ``make_router`` is called once per VM, on the VM's first connection
    (:meth:`vm`); ``deadline`` is each VM's handler deadline. The other
    arguments are :class:`~transports.service.supervisor.Front`'s: ``allow_uid``, when given, is the set of
    user ids whose connections are accepted (SO_PEERCRED); ``grace`` bounds
    how long a stop waits for in-flight intercepts; ``limits`` are the
    connection and VM limits; ``info`` is added to the statistics
    document's ``service`` part.
    """

    def __init__(
        self,
        make_router: Callable[[], Router],
        *,
        deadline: float | None = 5.0,
        allow_uid: frozenset[int] | None = None,
        grace: float = 5.0,
        limits: Limits | None = None,
        info: dict[str, Any] | None = None,
        max_regions: int = MAX_REGIONS,
        max_guest_memory: int = MAX_BYTES,
        state_dir: str | None = None,
        record: str | None = None,
        devices: Sequence[str] = (),
        device_paths: Sequence[str] = (),
    ) -> None:
        super().__init__(allow_uid=allow_uid, grace=grace, limits=limits, info=info)
        self.make_router = make_router
        self.deadline = deadline
        self.max_regions = max_regions
        self.max_guest_memory = max_guest_memory
        self.state_dir = state_dir
        """``serve --state-dir``: each VM's state is saved here by :meth:`save_states` and restored on its first
        connection (None: not kept)."""
        self.record = record
        """``serve --record``: the trace file each VM records to, the VM's id put in its name (None: none)."""
        self.recorders: list[Recorder] = []
        """Every VM's recorder, closed when the service stops (:meth:`close_recordings`)."""
        self._recorded_devices = (tuple(devices), tuple(device_paths))
        self.vms: dict[int, VmDevices] = {}
        """The VMs served so far, by id."""
        self.owners: dict[int, int] = {}
        """The user id each VM is served for (its first connection's)."""

    def vm(self, vm: int) -> VmDevices:
        """VM ``vm``'s devices and dispatcher, made (the device factories called) on first use."""
        devices = self.vms.get(vm)
        if devices is None:
            recorder = None
            if self.record is not None:
                specs, paths = self._recorded_devices
                recorder = open_recording(self.record, vm, devices=specs, device_paths=paths)
                self.recorders.append(recorder)
            devices = VmDevices(
                vm,
                self.make_router,
                deadline=self.deadline,
                grace=self.grace,
                max_regions=self.max_regions,
                max_guest_memory=self.max_guest_memory,
                recorder=recorder,
            )
            self._restore(devices)
            self.vms[vm] = devices
            devices.on_release = lambda: self._released(vm)
            if self.stopping:
                devices.stop()
            log.debug("VM %d: devices made; ports claimed: %s", vm, describe_ports(devices.ports) or "none")
        return devices

    def _restore(self, devices: VmDevices) -> None:
        if self.state_dir is None:
            return
        path = state_path(self.state_dir, devices.vm)
        try:
            text = read_state_file(path)
            if text is None:
                return
            devices.lifecycle.restore(text, source=f"state file {path}")
        except ImportError:
            raise StateFileError(path, "this service has no device state support") from None
        except StateFileError as error:
            failure = error
        except DispatchError as error:
            failure = StateFileError(path, error)
        else:
            remove_state_file(path)  # restored: a later failure must not bring this old state back
            log.info("VM %d: devices restored from %s", devices.vm, path)
            return
        log.error("VM %d: %s; move the file away to start it from reset", devices.vm, failure)
        raise failure

    def close_recordings(self) -> None:
        """Close every VM's trace file (``serve --record``), each with its end record."""
        for recorder in self.recorders:
            recorder.close()

    def _released(self, vm: int) -> None:
        # After a RELEASE: the VM is forgotten, with its saved state; its next connection starts from reset.
        released = self.vms.get(vm)
        if released is not None and released.recorder is not None:
            released.recorder.flush()  # closed when the service stops: connections may still be finishing
        self.vms.pop(vm, None)
        self.owners.pop(vm, None)
        if self.state_dir is not None:
            remove_state_file(state_path(self.state_dir, vm))

    def save_states(self) -> None:
        """Write every VM's device state to ``state_dir`` (when the service stops); failures are logged."""
        if self.state_dir is None:
            return
        for vm, devices in sorted(self.vms.items()):
            path = state_path(self.state_dir, vm)
            try:
                write_state_file(path, devices.lifecycle.save())
            except ImportError:
                log.error("VM %d: cannot save the device state: this service has no device state support", vm)
                return
            except (DispatchError, ValueError, OSError) as error:
                log.error("VM %d: cannot save its device state to %s: %s", vm, path, error)
                continue
            log.info("VM %d: device state saved to %s", vm, path)

    def served_vms(self) -> set[int]:
        return set(self.vms)

    def vm_owner(self, vm: int) -> int | None:
        return self.owners.get(vm)

    def vms_owned(self, uid: int) -> int:
        return sum(1 for owner in self.owners.values() if owner == uid)

    async def release_idle_vm(self, uid: int) -> bool:
        for vm, owner in self.owners.items():
            if owner == uid and self.vms[vm].connections_open == 0:
                log.info("VM %d: its devices go to make room for another VM of uid %d", vm, uid)
                self.vms.pop(vm).dispatcher.stop()
                del self.owners[vm]
                return True
        return False

    def snapshot(self, vm: int | None = None, *, viewer: int | None = None) -> dict[str, Any]:
        """The statistics document, built at once (the VMs all run on this event loop)."""
        service = self.service_part(isolation="none", deadline_seconds=self.deadline)
        parts = [devices.stats_part() for each, devices in self.vms.items() if self.visible(each, viewer)]
        return merge_stats(service=service, connections=self.connections_part(), parts=parts, vm=vm)

    async def stats_document(self, vm: int | None = None, *, viewer: int | None = None) -> dict[str, Any]:
        return self.snapshot(vm, viewer=viewer)

    async def inspect_document(self, vm: int | None = None, *, viewer: int | None = None) -> dict[str, Any]:
        parts = [(each, devices.devices()) for each, devices in self.vms.items() if self.visible(each, viewer)]
        return merge_inspect(parts, vm)

    async def stats_line(self) -> str:
        """The statistics line SIGUSR1 and ``--stats-interval`` log."""
        connections = (
            f"connections {self.connections_open} open, {self.connections_total} total, "
            f"{self.connections_refused} refused"
        )
        return format_document(self.snapshot(), extra=connections)

    def stop(self) -> None:
        """Stop accepting, stop reading, finish the intercepts already received, then let ``serve`` return.

        Each connection still answers the frames that had reached it (see
        :meth:`FdStreamTransport.stop_reading
        <transports.fdstream.FdStreamTransport.stop_reading>`); those still
        busy after ``grace`` seconds are cancelled. Control connections are
        closed at once.
        """
        super().stop()
        for devices in self.vms.values():
            devices.stop()

    async def serve_vm(self, transport: FdStreamTransport, hello: Hello, uid: int) -> None:
        try:
            try:
                devices = self.vm(hello.vm)
                self.owners.setdefault(hello.vm, uid)
            except (DispatchError, ValueError) as error:
                reason = str(error)
                if not isinstance(error, StateFileError):
                    reason = f"the devices of VM {hello.vm} could not be made: {reason}"
                # A state file's problem was logged once already, with what to do about it.
                level = logging.DEBUG if isinstance(error, StateFileError) else logging.ERROR
                log.log(level, "%s: %s", transport.name, reason)
                await refuse(transport, hello.vm, HelloStatus.NO_WORKER, reason, capabilities=SERVICE_CAPABILITIES)
                with anyio.CancelScope(shield=True):
                    await transport.aclose()
                return
            await devices.serve(transport)
        finally:
            self.connection_closed(uid)

    async def handle_stdio(self, transport: FdStreamTransport) -> None:
        """Serve the one VMM on ``transport`` (``--stdio``): its HELLO, then its intercepts."""
        try:
            opening = await read_opening(transport, self.limits.opening_timeout, capabilities=SERVICE_CAPABILITIES)
        except OpeningError as error:
            log.warning("%s: %s", transport.name, error)
            with anyio.CancelScope(shield=True):
                await transport.aclose()
            return
        if not isinstance(opening, Hello):  # pipes carry no control requests: read_opening refuses them
            await transport.aclose()
            return
        self.connections_total += 1
        self._open_by_uid[os.getuid()] += 1
        await self.serve_vm(transport, opening, os.getuid())


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
    try:
        path = config.socket or default_socket_path()
        directory = os.path.dirname(os.path.abspath(path))
        create = directory == ROOT_SOCKET_DIRECTORY
        if create or os.path.isdir(directory):  # else the bind below says what is missing
            # Where another user could remove the socket file, they could put their own in its place.
            check_bind_directory(path, create=create)
    except SocketPathError as error:
        raise ServiceStartError(str(error)) from None
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


def worker_settings(config: ServiceConfig) -> WorkerSettings:
    """What each worker process is started with, from the service's settings."""
    return WorkerSettings(
        devices=config.devices,
        device_paths=config.device_paths,
        deadline=config.deadline,
        grace=config.grace,
        log_level=config.log_level,
        log_rate=config.log_rate,
        backend=config.backend,
        limits=config.sandbox_limits().as_json(),
        max_regions=config.max_regions,
        max_guest_memory=config.max_guest_memory,
        state_dir=config.state_dir,
        record=config.record,
    )


def limits(config: ServiceConfig) -> Limits:
    """The connection and VM limits ``config`` sets."""
    return Limits(
        max_connections=config.max_connections,
        max_connections_per_uid=config.max_connections_per_uid,
        max_vms=config.max_vms,
        opening_timeout=config.opening_timeout,
    )


async def run(config: ServiceConfig, loader: DeviceLoader | None = None) -> int:
    """Serve ``config.devices`` as ``config`` says until stopped; the process exit status.

    In-process (``config.in_process`` or ``config.stdio``) the devices come
    from ``loader``; otherwise each VM's worker process loads them, and they
    are loaded once first, in a throwaway worker, to fail at once if they
    cannot be. Raises :class:`ServiceStartError` when the devices cannot be
    loaded or the socket or the metrics endpoint cannot be opened.
    """
    in_process = config.in_process or config.stdio
    make_router: Callable[[], Router] | None = None
    if in_process:
        if loader is None:
            loader = DeviceLoader(config.devices)
        spare = [loader.router()]  # made now, to fail at start: it serves the first VM
        ports = describe_ports(spare[0].port_ranges())
        factory = loader.router

        def make_router() -> Router:
            return spare.pop() if spare else factory()

    else:
        try:
            check_sandbox(config.sandbox_limits())
        except SandboxError as error:
            raise ServiceStartError(str(error)) from None
    listener = None if config.stdio else _listener(config)
    if not in_process:
        try:
            ports = await check_devices(worker_settings(config))
        except DispatchError as error:
            assert listener is not None
            await listener.aclose()
            raise ServiceStartError(f"cannot load the devices: {error}") from None
    where = "stdin/stdout" if listener is None else (listener.path or "an inherited socket")
    info = {"socket": where, "backend": config.backend, "version": _version()}
    service: Service | Supervisor
    if make_router is not None:
        service = Service(
            make_router,
            deadline=config.deadline,
            allow_uid=config.allow_uid,
            grace=config.grace,
            limits=limits(config),
            info=info,
            max_regions=config.max_regions,
            max_guest_memory=config.max_guest_memory,
            state_dir=config.state_dir,
            record=config.record,
            devices=config.devices,
            device_paths=config.device_paths,
        )
    else:
        service = Supervisor(
            worker_settings(config), allow_uid=config.allow_uid, grace=config.grace, limits=limits(config), info=info
        )
    metrics = None
    try:
        if config.metrics_port is not None:
            metrics = await _metrics_listener(config.metrics_address, config.metrics_port)
            log.info("metrics at %s", _url(metrics))
        mode = "in this process (unisolated)" if in_process else "a worker process per VM"
        log.info("serving on %s, %s; ports claimed: %s", where, mode, ports or "none")
        async with anyio.create_task_group() as tg:
            await tg.start(service.watch_signals, tg.cancel_scope)
            if config.stats_interval:
                tg.start_soon(service.report_stats, config.stats_interval)
            if metrics is not None:
                from .exposition import serve_metrics

                tg.start_soon(serve_metrics, metrics, service.stats_document)
                metrics = None  # serve_metrics closes it
            if listener is None:
                assert isinstance(service, Service)
                await service.handle_stdio(stdio_transport())
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
    if isinstance(service, Service):
        service.close_recordings()
        if not service.forced:
            service.save_states()
        log.info("stopped; stats: %s", await service.stats_line())
    else:
        log.info(
            "stopped; %d connection(s) served, %d refused; %d worker(s) started, %d failed",
            service.connections_total,
            service.connections_refused,
            service.workers_started,
            service.workers_failed,
        )
    return 1 if service.forced else 0


async def _run_logged(config: ServiceConfig, loader: DeviceLoader | None, limiter: RateLimit) -> int:
    async def flush_summaries() -> None:
        while True:
            await anyio.sleep(1)
            limiter.flush()

    failure = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(flush_summaries)
            try:
                status = await run(config, loader)
            except ServiceStartError as error:
                # Raised as it is, not inside the exception group the task group would make of it.
                failure, status = error, EXIT_FAILED
            tg.cancel_scope.cancel()
    finally:
        limiter.flush(everything=True)
    if failure is not None:
        raise failure
    return status


def _run(config: ServiceConfig, loader: DeviceLoader | None, limiter: RateLimit) -> int:
    if config.backend == "uvloop":
        return anyio.run(_run_logged, config, loader, limiter, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(_run_logged, config, loader, limiter, backend=config.backend)


def main(argv: Sequence[str] | None = None, *, default_devices: Sequence[str] = ()) -> int:
    """The ``serve`` command; returns the exit status (listed in ``--help``).

    ``default_devices`` are the device specs (``module:factory``) served
    when neither ``--device`` nor the config file names a device; without
    them, one of those must.
    """
    parser = argument_parser(has_default_devices=bool(default_devices))
    args = parser.parse_args(argv)
    try:
        config = config_from_arguments(args)
        check_backend(config.backend)
        if config.metrics_port is not None:
            check_metrics()
    except (ConfigError, BackendUnavailableError, MetricsUnavailableError) as error:
        parser.error(str(error))
    if not config.devices:
        if not default_devices:
            return parser.fail("no devices to serve; name them with --device MODULE:ATTR", EXIT_USAGE)
        config = replace(config, devices=tuple(default_devices))
    limiter = configure_logging(config.log_level, rate=config.log_rate)
    loader = None
    if config.in_process or config.stdio:
        # Device code comes from installed packages and --device-path only, never the working directory.
        add_device_paths(config.device_paths)
        try:
            loader = DeviceLoader(config.devices)
        except (DispatchError, ValueError, ImportError) as error:
            return parser.fail(f"cannot load the devices: {error}", EXIT_FAILED)
    try:
        return _run(config, loader, limiter)
    except ServiceStartError as error:
        return parser.fail(str(error), EXIT_FAILED)
    except (DispatchError, ValueError) as error:
        return parser.fail(f"cannot load the devices: {error}", EXIT_FAILED)
    except OSError as error:
        return parser.fail(f"stopped: {error}", EXIT_FAILED)
