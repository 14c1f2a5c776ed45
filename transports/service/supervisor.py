"""The isolated service: a supervisor that accepts connections and one worker process per VM.

The supervisor binds the socket, accepts, checks the peer (SO_PEERCRED,
``--allow-uid``), reads the opening (:mod:`.opening`) and applies the
limits (:class:`Limits`). A VMM's connection then goes, as a descriptor, to
its VM's worker (:mod:`.worker`): started on the VM's first connection with
``python -P -m transports.service.worker`` (never the working directory on
``sys.path``); the VM's later connections go to the same worker. The
supervisor runs no device code.

A worker that dies (a crash, SIGBUS, a kill) or exits after a hung handler
ends only its VM: the supervisor logs why (the signal's name or the exit
status), counts it, and the VM's next connection starts a new worker. Its
VMM's connections close with it. A tool's control requests (``stats``,
``inspect``, the Prometheus endpoint) reach the supervisor, which asks every
worker for its part and merges them.

:class:`Front` is what the supervisor and the in-process service
(:class:`~transports.service.server.Service`) share: accepting, the peer
check, the opening, the limits and the control requests.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from dispatcher import DispatchError, TransportError
from dispatcher.hello import Hello, HelloStatus

from ..shared_memory import MAX_BYTES, MAX_REGIONS
from ..unix import PeerCredentials, UnixListener, UnixTransport
from . import systemd
from .control import ControlRequest, Reply, Request, Status, serve_control
from .opening import ControlRequestStart, OpeningError, read_opening, refuse
from .ratelimit import DEFAULT_LOG_RATE
from .report import UnknownVmError, merge_inspect, merge_stats
from .stats import format_document
from .worker import EXIT_HUNG, EXIT_NO_DEVICES, SERVICE_CAPABILITIES, StateFileError
from .worker_channel import Channel, ChannelError, channel_pair

__all__ = [
    "Front",
    "Limits",
    "Supervisor",
    "WorkerHandle",
    "WorkerSettings",
    "check_devices",
    "exit_cause",
    "read_state_file",
    "remove_state_file",
    "state_path",
    "worker_command",
    "write_state_file",
]

log = logging.getLogger("intercept_dispatch.service")

REPLY_TIMEOUT = 5.0
"""Seconds the supervisor waits for a worker's part of a statistics or inspection document."""
START_TIMEOUT = 60.0
"""Seconds a new worker has to load its devices and say it is ready."""
MAX_STATE_FILE = 16 << 20
"""The longest state file ``serve --state-dir`` reads back: 16 MiB."""


def state_path(directory: str, vm: int) -> str:
    """Where ``serve --state-dir`` keeps VM ``vm``'s device state: ``DIR/vm-<id>.json``."""
    return os.path.join(directory, f"vm-{vm}.json")


def read_state_file(path: str) -> str | None:
    """The state file's text, None if there is none; :class:`~transports.service.worker.StateFileError` if it
    cannot be read."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_STATE_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise StateFileError(path, f"cannot read it: {error.strerror or error}") from None
    if len(data) > MAX_STATE_FILE:
        raise StateFileError(path, f"longer than {MAX_STATE_FILE} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError as error:
        raise StateFileError(path, f"not UTF-8 text (byte {error.start})") from None


def write_state_file(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, synced, then renamed), mode 0600."""
    directory = os.path.dirname(path) or "."
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(text.encode())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # The rename is durable once the directory is synced.
    with contextlib.suppress(OSError):
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)


def remove_state_file(path: str) -> None:
    """Remove a state file (restored, or its VM released); a missing one is no error, others are logged."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.error("cannot remove the state file %s: %s", path, error.strerror or error)


@dataclass(frozen=True, slots=True)
class Limits:
    """What the service accepts at most (each a ``serve`` option; docs/SERVICE.md lists them)."""

    max_connections: int = 1024
    """VMM connections open at once, over every VM (``--max-connections``)."""
    max_connections_per_uid: int = 64
    """VMM connections open at once from one user id (``--max-connections-per-uid``)."""
    max_vms: int = 256
    """VMs served at once (``--max-vms``): a HELLO naming another VM past it is refused."""
    opening_timeout: float = 5.0
    """Seconds a new connection has to send its HELLO or control request (``--opening-timeout``)."""


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What a worker needs to know: the devices, where their code is, and how to serve them."""

    devices: tuple[str, ...]
    device_paths: tuple[str, ...] = ()
    deadline: float | None = 5.0
    grace: float = 5.0
    log_level: str = "INFO"
    log_rate: int = DEFAULT_LOG_RATE
    backend: str = "asyncio"
    limits: dict[str, Any] | None = None
    """The sandbox's limits (``SandboxLimits.as_json()``), applied in the worker; None: no sandbox."""
    max_regions: int = MAX_REGIONS
    max_guest_memory: int = MAX_BYTES
    state_dir: str | None = None
    """``serve --state-dir``: where each VM's device state is kept across restarts (None: it is not)."""
    record: str | None = None
    """``serve --record``: the trace file each VM's worker records to, the VM's id put in its name (None: none)."""

    def start_message(self, vm: int, *, probe: bool = False) -> dict[str, Any]:
        """The ``start`` message of a worker for VM ``vm`` (``probe``: load the devices, answer, exit)."""
        return {
            "op": "start",
            "vm": vm,
            "probe": probe,
            "devices": list(self.devices),
            "device_paths": list(self.device_paths),
            "deadline": self.deadline,
            "grace": self.grace,
            "log_level": self.log_level,
            "log_rate": self.log_rate,
            "limits": self.limits,
            "max_regions": self.max_regions,
            "max_guest_memory": self.max_guest_memory,
            "save_on_stop": self.state_dir is not None and not probe,
            "record": None if probe else self.record,
        }


def exit_cause(returncode: int | None) -> str:
    """Why a worker ended, in words: ``killed by SIGKILL``, ``exited with status 1``."""
    if returncode is None:
        return "ended"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    if returncode == EXIT_HUNG:
        return f"exited after a handler hung (status {returncode})"
    if returncode == EXIT_NO_DEVICES:
        return f"could not load its devices or apply its sandbox (status {returncode})"
    return f"exited with status {returncode}"


def worker_command(channel_fd: int, backend: str) -> list[str]:
    """How a worker process is started: ``-P`` keeps the working directory off its ``sys.path``."""
    return [sys.executable, "-P", "-m", "transports.service.worker", str(channel_fd), backend]


async def check_devices(settings: WorkerSettings) -> str:
    """Load the devices once in a throwaway worker process; the ports they claim, for the log.

    Raises :class:`~dispatcher.DispatchError` saying why they cannot be loaded (or a
    device marked shared), so ``serve`` fails at once instead of on the
    first connection.
    """
    ours, theirs = channel_pair()
    channel = Channel(ours, name="device check")
    try:
        process = await anyio.open_process(
            worker_command(theirs.fileno(), settings.backend),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=None,
            pass_fds=(theirs.fileno(),),
        )
    except OSError as error:
        channel.close()
        raise DispatchError(f"cannot start a worker process ({sys.executable}): {error.strerror or error}") from None
    finally:
        theirs.close()
    try:
        with anyio.fail_after(START_TIMEOUT):
            await channel.send(settings.start_message(0, probe=True))
            try:
                message, _ = await channel.receive()
            except ChannelError:
                message = {"op": "failed", "error": f"the device check {exit_cause(await process.wait())}"}
            await process.wait()
    except TimeoutError:
        process.kill()
        raise DispatchError(f"loading the devices took longer than {START_TIMEOUT:g} s") from None
    finally:
        channel.close()
        await process.aclose()
    if message.get("op") != "ready":
        raise DispatchError(str(message.get("error", "the device check failed")))
    return str(message.get("ports", ""))


class Front:
    """Accepting connections, the peer check, the opening, the limits and control requests.

    Subclasses serve a VMM's connection (:meth:`serve_vm`) and build the
    documents (:meth:`stats_document`, :meth:`inspect_document`).
    """

    def __init__(
        self,
        *,
        allow_uid: frozenset[int] | None = None,
        grace: float = 5.0,
        limits: Limits | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.allow_uid = allow_uid
        self.grace = grace
        self.limits = limits or Limits()
        self.info = dict(info or {})
        self.connections_total = 0
        self.connections_refused = 0
        self.control_total = 0
        self.stopping = False
        self.forced = False
        self._started = time.monotonic()
        self._open_by_uid: Counter[int] = Counter()
        self._openings: set[anyio.CancelScope] = set()
        self._control: set[anyio.CancelScope] = set()
        self._accepting: anyio.CancelScope | None = None
        self._numbers = itertools.count(1)

    # What subclasses provide.

    @property
    def connections_open(self) -> int:
        """VMM connections open (past their HELLO), over every VM."""
        return sum(self._open_by_uid.values())

    def served_vms(self) -> set[int]:
        """The VMs served now."""
        raise NotImplementedError

    def vm_owner(self, vm: int) -> int | None:
        """The user id VM ``vm`` is served for (its first connection's), None if it is not served."""
        raise NotImplementedError

    def vms_owned(self, uid: int) -> int:
        """How many VMs are served for user ``uid``."""
        raise NotImplementedError

    async def release_idle_vm(self, uid: int) -> bool:
        """End the oldest VM of ``uid`` that has no connection open; False if there is none."""
        raise NotImplementedError

    async def serve_vm(self, transport: UnixTransport, hello: Hello, uid: int) -> None:
        """Serve (or hand over) one VMM connection whose HELLO passed the limits; owns ``transport``.

        Must call ``connection_closed(uid)`` once the connection has ended.
        """
        raise NotImplementedError

    async def stats_document(self, vm: int | None = None, *, viewer: int | None = None) -> dict[str, Any]:
        """What ``intercept-dispatch stats`` shows (docs/SERVICE.md); only VM ``vm`` in its ``vms`` part if given.

        ``viewer``: a user id that sees only the VMs served for it (None: every VM).
        """
        raise NotImplementedError

    async def inspect_document(self, vm: int | None = None, *, viewer: int | None = None) -> dict[str, Any]:
        """What ``intercept-dispatch inspect`` shows: every VM's devices (only ``vm``'s if given; ``viewer``'s)."""
        raise NotImplementedError

    def visible(self, vm: int, viewer: int | None) -> bool:
        """Whether user ``viewer`` may see VM ``vm``'s counts and devices (None: the operator, who sees all)."""
        return viewer is None or self.vm_owner(vm) == viewer

    def stop(self) -> None:
        """Stop accepting and close the connections still opening and the control connections."""
        self.stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
        for scope in (*self._openings, *self._control):
            scope.cancel()

    async def stats_line(self) -> str:
        """The statistics line SIGUSR1 and ``--stats-interval`` log."""
        raise NotImplementedError

    def in_flight(self) -> str:
        """What a graceful stop waits for, in words, for its log line."""
        return f"finishing the intercepts in flight on {self.connections_open} connection(s)"

    def force_stop(self) -> None:
        """A second signal: stop without waiting."""
        self.forced = True

    # Shared.

    async def watch_signals(
        self, force: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """SIGTERM/SIGINT: stop gracefully (a second one stops at once and cancels ``force``); SIGUSR1: statistics."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            task_status.started()
            async for number in signals:
                name = signal.Signals(number).name
                if number == signal.SIGUSR1:
                    log.info("stats: %s", await self.stats_line())
                elif not self.stopping:
                    log.info("%s: stopping; %s", name, self.in_flight())
                    systemd.notify("STOPPING=1")
                    self.stop()
                else:
                    log.warning("%s again: exiting without waiting", name)
                    self.force_stop()
                    force.cancel()

    async def report_stats(self, interval: float) -> None:
        """Log a statistics line every ``interval`` seconds."""
        while True:
            await anyio.sleep(interval)
            log.info("stats: %s", await self.stats_line())

    def connection_closed(self, uid: int) -> None:
        """A VMM connection of ``uid`` has ended."""
        self._open_by_uid[uid] -= 1
        if self._open_by_uid[uid] <= 0:
            del self._open_by_uid[uid]

    def connections_part(self) -> dict[str, int]:
        """The ``connections`` part of the statistics document."""
        return {
            "open": self.connections_open,
            "total": self.connections_total,
            "refused": self.connections_refused,
            "control": self.control_total,
        }

    def service_part(self, **more: Any) -> dict[str, Any]:
        """The ``service`` part of the statistics document."""
        return {
            "pid": os.getpid(),
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            **self.info,
            **more,
        }

    async def answer(self, request: ControlRequest, *, viewer: int | None = None) -> Reply:
        """The reply to one control request; ``viewer`` as in :meth:`stats_document`."""
        try:
            if request.kind == Request.STATS:
                document = await self.stats_document(request.vm, viewer=viewer)
            elif request.kind == Request.INSPECT:
                document = await self.inspect_document(request.vm, viewer=viewer)
            else:
                known = ", ".join(f"{r.value} ({r.name.lower()})" for r in Request)
                return Reply(Status.UNKNOWN_REQUEST, f"unknown control request {request.kind}; known: {known}".encode())
        except UnknownVmError as error:
            return Reply(Status.NO_SUCH_VM, str(error).encode())
        return Reply(Status.OK, json.dumps(document, separators=(",", ":")).encode())

    async def serve(
        self, listener: UnixListener, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept connections until :meth:`stop`; return once every connection has been dealt with."""
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
                        peer = self._admit(transport, next(self._numbers))
                        if peer is not None:
                            connections.start_soon(self.handle, transport, peer)
                        else:
                            await transport.aclose()
            finally:
                with anyio.CancelScope(shield=True):
                    await listener.aclose()

    def _admit(self, transport: UnixTransport, number: int) -> PeerCredentials | None:
        try:
            peer = transport.peer_credentials()
        except OSError as error:
            transport.name = f"connection {number}"
            log.warning("%s: refused, its peer is unknown (%s)", transport.name, error)
            return None
        transport.name = f"connection {number} (pid {peer.pid}, uid {peer.uid})"
        if self.allow_uid is not None and peer.uid not in self.allow_uid:
            self.connections_refused += 1
            log.warning("%s: refused, uid %d is not allowed", transport.name, peer.uid)
            return None
        if len(self._openings) >= self.limits.max_connections:
            # So many connections still opening: no more are read until they are through.
            self.connections_refused += 1
            log.warning("%s: refused, %d connections are still opening", transport.name, len(self._openings))
            return None
        return peer

    async def handle(self, transport: UnixTransport, peer: PeerCredentials) -> None:
        """One accepted connection: its opening, then a VM's connection or a tool's control requests."""
        opening: Hello | ControlRequestStart | None = None
        with anyio.CancelScope() as scope:
            self._openings.add(scope)
            if self.stopping:
                scope.cancel()
            try:
                opening = await read_opening(transport, self.limits.opening_timeout, capabilities=SERVICE_CAPABILITIES)
            except OpeningError as error:
                log.debug("%s: %s", transport.name, error)
            finally:
                self._openings.discard(scope)
        if opening is None:
            with anyio.CancelScope(shield=True):
                await transport.aclose()
            return
        if isinstance(opening, ControlRequestStart):
            # Device registers are a VM's state: a user sees the VMs served for it; root and the
            # service's own user (the operator) see every VM.
            viewer = None if peer.uid in (0, os.geteuid()) else peer.uid
            await self._serve_control(transport, viewer)
            return
        reason = self._limit_refusal(opening, peer.uid)
        if reason is None and self._over_vm_quota(opening.vm, peer.uid):
            # One user may keep as many VMs as connections: the oldest of its VMs without a connection
            # makes room (its devices go with it), else the new VM is refused.
            if await self.release_idle_vm(peer.uid):
                reason = self._limit_refusal(opening, peer.uid)
            if reason is None and self._over_vm_quota(opening.vm, peer.uid):
                reason = (
                    f"uid {peer.uid} has {self.vms_owned(peer.uid)} VMs with connections open, the most one user "
                    "may (--max-connections-per-uid)"
                )
        if reason is not None:
            self.connections_refused += 1
            log.warning("%s: refused VM %d: %s", transport.name, opening.vm, reason)
            await refuse(transport, opening.vm, HelloStatus.REFUSED, reason, capabilities=SERVICE_CAPABILITIES)
            with anyio.CancelScope(shield=True):
                await transport.aclose()
            return
        self.connections_total += 1
        self._open_by_uid[peer.uid] += 1
        log.debug("%s: connected, VM %d", transport.name, opening.vm)
        await self.serve_vm(transport, opening, peer.uid)

    def _over_vm_quota(self, vm: int, uid: int) -> bool:
        return vm not in self.served_vms() and self.vms_owned(uid) >= self.limits.max_connections_per_uid

    def _limit_refusal(self, hello: Hello, uid: int) -> str | None:
        limits = self.limits
        if self.stopping:
            return "the service is stopping"
        owner = self.vm_owner(hello.vm)
        if owner is not None and owner != uid:
            # The VM id is only the HELLO's word: a VM is its first user's while it is served.
            return f"VM {hello.vm} is served for another user"
        if self.connections_open >= limits.max_connections:
            return f"the service has {self.connections_open} connections open, its most (--max-connections)"
        if self._open_by_uid[uid] >= limits.max_connections_per_uid:
            return (
                f"uid {uid} has {self._open_by_uid[uid]} connections open, the most one user may "
                "(--max-connections-per-uid)"
            )
        served = self.served_vms()
        if hello.vm not in served and len(served) >= limits.max_vms:
            return f"the service serves {len(served)} VMs, its most (--max-vms)"
        return None

    async def _serve_control(self, transport: UnixTransport, viewer: int | None) -> None:
        self.control_total += 1
        log.debug("%s: control connection", transport.name)
        with anyio.CancelScope() as scope:
            self._control.add(scope)
            if self.stopping:
                scope.cancel()
            try:
                await serve_control(transport, functools.partial(self.answer, viewer=viewer))
            except TransportError as error:
                log.debug("%s: %s", transport.name, error)
            finally:
                self._control.discard(scope)
                with anyio.CancelScope(shield=True):
                    await transport.aclose()
        log.debug("%s: control connection closed", transport.name)


class WorkerHandle:
    """The supervisor's view of one VM's worker process: its process, channel, state and connections."""

    def __init__(self, vm: int, owner: int) -> None:
        self.vm = vm
        self.owner = owner
        self.dying = False
        self.process: anyio.abc.Process | None = None
        self.channel: Channel | None = None
        self.ready = anyio.Event()
        self.ended = anyio.Event()
        self.failure: str | None = None
        self.pid: int | None = None
        self.connections: dict[int, int] = {}  # connection number -> uid
        self.replies: dict[int, tuple[anyio.Event, list[dict[str, Any]]]] = {}
        self.stop_sent = False
        self.killed = False
        self.released = False
        self.state_failure = False  # its failure is its state file's: the HELLO's refusal says just that


class Supervisor(Front):
    """The isolated service: one worker process per VM, started on the VM's first connection.

    ``settings`` is what each worker is started with; the other arguments
    are :class:`Front`'s.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        allow_uid: frozenset[int] | None = None,
        grace: float = 5.0,
        limits: Limits | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(allow_uid=allow_uid, grace=grace, limits=limits, info=info)
        self.settings = settings
        self.workers: dict[int, WorkerHandle] = {}
        self.workers_started = 0
        self.workers_failed = 0
        self.workers_hung = 0
        self._requests = itertools.count(1)
        self._task_group: anyio.abc.TaskGroup | None = None

    def served_vms(self) -> set[int]:
        return set(self.workers)

    def vm_owner(self, vm: int) -> int | None:
        worker = self.workers.get(vm)
        return None if worker is None else worker.owner

    def vms_owned(self, uid: int) -> int:
        return sum(1 for worker in self.workers.values() if worker.owner == uid)

    async def release_idle_vm(self, uid: int) -> bool:
        idle = [w for w in self.workers.values() if w.owner == uid and not w.connections and w.ready.is_set()]
        if not idle:
            return False
        worker = idle[0]  # the oldest: workers are kept in the order they started
        log.info("VM %d: its worker (pid %s) stops to make room for another VM of uid %d", worker.vm, worker.pid, uid)
        await self._send_stop(worker)
        with anyio.move_on_after(self.grace):
            await worker.ended.wait()
        if not worker.ended.is_set():
            self._kill(worker)
            await worker.ended.wait()
        return True

    async def serve(
        self, listener: UnixListener, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept until :meth:`~Front.stop`; then stop the workers (killing those left after the grace period)."""
        async with anyio.create_task_group() as self._task_group:
            await super().serve(listener, task_status=task_status)
            await self._stop_workers()

    async def _stop_workers(self) -> None:
        workers = list(self.workers.values())
        if not workers:
            return
        log.info("stopping %d worker(s); each finishes the intercepts in flight", len(workers))
        with anyio.move_on_after(self.grace):
            for worker in workers:
                await self._send_stop(worker)
            for worker in workers:
                await worker.ended.wait()
        left = [worker for worker in workers if not worker.ended.is_set()]
        for worker in left:
            log.warning("VM %d: its worker (pid %s) did not stop within the %g s grace period; killing it",
                        worker.vm, worker.pid, self.grace)  # fmt: skip
            self._kill(worker)
        for worker in left:
            await worker.ended.wait()

    async def _send_stop(self, worker: WorkerHandle) -> None:
        if worker.stop_sent or worker.channel is None:
            return
        worker.stop_sent = True
        with contextlib.suppress(ChannelError):
            await worker.channel.send({"op": "stop"})

    def _kill(self, worker: WorkerHandle) -> None:
        if worker.process is not None and worker.process.returncode is None:
            worker.killed = True
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()

    def kill_all(self) -> None:
        """Kill every worker at once (a second signal)."""
        for worker in self.workers.values():
            worker.stop_sent = True
            self._kill(worker)

    async def serve_vm(self, transport: UnixTransport, hello: Hello, uid: int) -> None:
        number = int(transport.name.split()[1]) if transport.name.startswith("connection ") else 0
        handed = False
        try:
            reason = f"the worker of VM {hello.vm} ended as the connection was handed to it"
            for _ in range(2):  # a worker that dies just then is replaced once
                worker = await self._worker_for(hello.vm, uid)
                if worker.failure is not None:
                    reason = worker.failure
                    if not worker.state_failure:
                        reason = f"the worker of VM {hello.vm} could not start: {reason}"
                    break
                if worker.channel is None:
                    await worker.ended.wait()
                    continue
                worker.connections[number] = uid
                try:
                    await worker.channel.send(
                        {"op": "connection", "id": number, "name": transport.name}, [transport.socket.fileno()]
                    )
                except ChannelError:
                    worker.connections.pop(number, None)
                    await worker.ended.wait()
                    continue
                handed = True
                break
            if not handed:
                # A state file's problem was logged once already, with what to do about it.
                log.log(logging.DEBUG if worker.state_failure else logging.ERROR, "%s: %s", transport.name, reason)
                await refuse(transport, hello.vm, HelloStatus.NO_WORKER, reason, capabilities=SERVICE_CAPABILITIES)
        finally:
            if not handed:
                self.connection_closed(uid)
            with anyio.CancelScope(shield=True):
                await transport.aclose()  # the worker has its own copy of the descriptor

    async def _worker_for(self, vm: int, uid: int) -> WorkerHandle:
        worker = self.workers.get(vm)
        while worker is not None and worker.dying:
            await worker.ended.wait()  # its replacement starts once it is gone
            worker = self.workers.get(vm)
        if worker is None:
            worker = self.workers[vm] = WorkerHandle(vm, uid)
            assert self._task_group is not None
            self._task_group.start_soon(self._run_worker, worker)
        await worker.ready.wait()
        return worker

    async def _run_worker(self, worker: WorkerHandle) -> None:
        ours, theirs = channel_pair()
        channel = Channel(ours, name=f"VM {worker.vm}'s worker channel")
        try:
            try:
                worker.process = await anyio.open_process(
                    worker_command(theirs.fileno(), self.settings.backend),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=None,
                    pass_fds=(theirs.fileno(),),
                )
            finally:
                theirs.close()
            worker.pid = worker.process.pid
            self.workers_started += 1
            worker.channel = channel
            start = self.settings.start_message(worker.vm)
            saved = self._state_path(worker.vm)
            if saved is not None:
                try:
                    text = read_state_file(saved)
                except StateFileError as error:
                    text = None
                    worker.failure, worker.state_failure = str(error), True
                    self._kill(worker)
                if text is not None:
                    start.update(state=text, state_path=saved)
            message: dict[str, Any] = {"op": "failed"}
            with anyio.move_on_after(START_TIMEOUT) as starting:
                if worker.failure is None:
                    await channel.send(start)
                    message, _ = await channel.receive()
            if worker.failure is not None:
                pass
            elif starting.cancelled_caught:
                worker.failure = f"it did not load its devices within {START_TIMEOUT:g} s"
                self._kill(worker)
            elif message["op"] != "ready":
                worker.failure = str(message.get("error", message["op"]))
                worker.state_failure = bool(message.get("state"))
            else:
                if message.get("restored") and saved is not None:
                    # Restored: the file has done its work (a crash later must not bring back this old state).
                    remove_state_file(saved)
                    log.info("VM %d: worker started (pid %d), devices restored from %s", worker.vm, worker.pid, saved)
                else:
                    log.info("VM %d: worker started (pid %d)", worker.vm, worker.pid)
                worker.ready.set()
                await self._listen(worker)
        except ChannelError:
            pass  # the worker ended: its exit status says why
        except OSError as error:
            worker.failure = f"cannot start a process: {error}"
        finally:
            worker.dying = True
            worker.channel = None
            channel.close()
            with anyio.CancelScope(shield=True):
                await self._ended(worker)

    async def _listen(self, worker: WorkerHandle) -> None:
        assert worker.channel is not None
        if self.stopping:
            await self._send_stop(worker)
        while True:
            message, fds = await worker.channel.receive()
            for fd in fds:
                os.close(fd)
            op = message["op"]
            if op == "closed":
                uid = worker.connections.pop(int(message.get("id", 0)), None)
                if uid is not None:
                    self.connection_closed(uid)
            elif op == "reply":
                waiting = worker.replies.pop(int(message.get("id", 0)), None)
                if waiting is not None:
                    waiting[1].append(message)
                    waiting[0].set()
            elif op == "released":
                # A RELEASE: the worker exits next; the VM's next connection gets a new one, from reset.
                worker.released = worker.stop_sent = worker.dying = True
                saved = self._state_path(worker.vm)
                if saved is not None:
                    remove_state_file(saved)
                log.info("VM %d: released; its worker (pid %s) exits", worker.vm, worker.pid)
            elif op == "state":
                self._keep_state(worker, message.get("state"))

    def _state_path(self, vm: int) -> str | None:
        directory = self.settings.state_dir
        return None if directory is None else state_path(directory, vm)

    def _keep_state(self, worker: WorkerHandle, text: object) -> None:
        saved = self._state_path(worker.vm)
        if saved is None or not isinstance(text, str):
            return
        try:
            write_state_file(saved, text)
        except OSError as error:
            log.error("VM %d: cannot write its state to %s: %s", worker.vm, saved, error.strerror or error)
            return
        log.info("VM %d: device state saved to %s", worker.vm, saved)

    async def _ended(self, worker: WorkerHandle) -> None:
        returncode: int | None = None
        if worker.process is not None:
            with anyio.move_on_after(self.grace + 1) as waiting:
                returncode = await worker.process.wait()
            if waiting.cancelled_caught:
                self._kill(worker)
                returncode = await worker.process.wait()
            await worker.process.aclose()
        cause = exit_cause(returncode)
        if worker.failure is not None and worker.pid is not None:
            advice = "; move the file away to start it from reset" if worker.state_failure else ""
            log.error("VM %d: its worker (pid %d) cannot serve: %s%s", worker.vm, worker.pid, worker.failure, advice)
        if worker.stop_sent and (returncode == 0 or worker.killed):
            # Told to stop: an exit is expected, and a kill after the grace period was logged already.
            log.debug("VM %d: its worker (pid %s) %s", worker.vm, worker.pid, cause)
        elif worker.stop_sent:
            self.workers_failed += 1
            log.error("VM %d: its worker (pid %s) %s while stopping", worker.vm, worker.pid, cause)
        elif worker.failure is None:
            self.workers_failed += 1
            if returncode == EXIT_HUNG:
                self.workers_hung += 1
            log.error("VM %d: its worker (pid %s) %s; %d connection(s) of this VM closed",
                      worker.vm, worker.pid, cause, len(worker.connections))  # fmt: skip
        for uid in worker.connections.values():
            self.connection_closed(uid)
        worker.connections.clear()
        for event, _ in worker.replies.values():
            event.set()
        worker.replies.clear()
        if self.workers.get(worker.vm) is worker:
            del self.workers[worker.vm]
        worker.ready.set()  # a connection waiting for it learns it failed
        worker.ended.set()

    async def _ask(self, worker: WorkerHandle, op: str) -> dict[str, Any] | None:
        """Ask one worker for its part; None when it does not answer in time (hung, or ended)."""
        if worker.channel is None or not worker.ready.is_set():
            return None
        number = next(self._requests)
        event, answers = anyio.Event(), list[dict[str, Any]]()
        worker.replies[number] = (event, answers)
        with anyio.move_on_after(REPLY_TIMEOUT):
            try:
                await worker.channel.send({"op": op, "id": number})
            except ChannelError:
                return None
            await event.wait()
        worker.replies.pop(number, None)
        return answers[0] if answers else None

    async def _gather(self, op: str, viewer: int | None) -> tuple[list[dict[str, Any]], list[int]]:
        """The answer to ``op`` of every worker ``viewer`` may see, and the VMs whose worker did not answer."""
        workers = [
            w for w in self.workers.values() if w.ready.is_set() and w.failure is None and self.visible(w.vm, viewer)
        ]
        answers: dict[int, dict[str, Any] | None] = {}

        async def ask(worker: WorkerHandle) -> None:
            answers[worker.vm] = await self._ask(worker, op)

        async with anyio.create_task_group() as tg:
            for worker in workers:
                tg.start_soon(ask, worker)
        found = [answer for answer in answers.values() if answer is not None]
        silent = sorted(vm for vm, answer in answers.items() if answer is None)
        return found, silent

    def workers_part(self, unanswered: list[int]) -> dict[str, Any]:
        """The ``workers`` part of the statistics document."""
        return {
            "running": len(self.workers),
            "started": self.workers_started,
            "failed": self.workers_failed,
            "hung": self.workers_hung,
            "pids": {str(vm): worker.pid for vm, worker in sorted(self.workers.items()) if worker.pid is not None},
            "unanswered_vms": unanswered,
        }

    async def stats_document(self, vm: int | None = None, *, viewer: int | None = None) -> dict[str, Any]:
        answers, silent = await self._gather("stats", viewer)
        document = merge_stats(
            service=self.service_part(isolation="process", deadline_seconds=self.settings.deadline),
            connections=self.connections_part(),
            parts=[answer["part"] for answer in answers],
            vm=vm,
        )
        document["workers"] = self.workers_part(silent)
        return document

    async def inspect_document(self, vm: int | None = None, *, viewer: int | None = None) -> dict[str, Any]:
        answers, _ = await self._gather("inspect", viewer)
        parts = [(int(answer["vm"]), answer["devices"]) for answer in answers]
        return merge_inspect(parts, vm)

    async def stats_line(self) -> str:
        """The statistics line SIGUSR1 and ``--stats-interval`` log."""
        document = await self.stats_document()
        workers = document["workers"]
        extra = (
            f"connections {self.connections_open} open, {self.connections_total} total, "
            f"{self.connections_refused} refused; workers {workers['running']} running, "
            f"{workers['failed']} failed"
        )
        return format_document(document, extra=extra)

    def in_flight(self) -> str:
        return f"{len(self.workers)} worker(s) finish the intercepts in flight on {self.connections_open} connection(s)"

    def force_stop(self) -> None:
        """A second signal: kill every worker at once."""
        super().force_stop()
        log.warning("killing %d worker(s)", len(self.workers))
        self.kill_all()
