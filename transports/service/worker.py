"""One VM's devices, and the worker process that serves them (``python -P -m transports.service.worker``).

:class:`VmDevices` is what serves one VM: its own router (every device
factory called once for it), its own :class:`~dispatcher.Dispatcher`, its
counts. The in-process service keeps one per VM; the isolated service
(the default) runs one per **worker process**, which the supervisor
(:mod:`.supervisor`) starts on the VM's first connection and hands that
VM's connections to over a channel (:mod:`.worker_channel`).

A worker process loads the devices (the specs and ``--device-path``
directories the supervisor passes; never the working directory: it runs
``python -P``), applies the sandbox, says ``ready``, then answers HELLO
ACCEPTED and the port announcement on each connection it is handed and
serves it. A handler that hangs past its deadline makes the worker exit
(status :data:`EXIT_HUNG`) so that a fresh one takes the VM's next
connection; a crash ends this VM only.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import inspect
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import anyio
import anyio.abc

from dispatcher import Dispatcher, DispatchError, PortRange, Router, TransportError, encode_announcement
from dispatcher.hello import Capability

from ..latency import LatencySamples
from ..shared_memory import MAX_BYTES, MAX_REGIONS, RegionBudget, with_shared_memory
from ..unix import UnixTransport
from .devices import DeviceLoader, add_device_paths
from .metrics import instrument
from .opening import accept
from .ratelimit import DEFAULT_LOG_RATE, RateLimit, template_key
from .report import vm_devices, vm_part
from .sandbox import SandboxLimits, apply_sandbox, deny_io_uring
from .worker_channel import Channel, ChannelClosedError, ChannelError

__all__ = [
    "EXIT_HUNG",
    "EXIT_NO_DEVICES",
    "LOG_FORMAT",
    "SERVICE_CAPABILITIES",
    "VmDevices",
    "configure_logging",
    "describe_ports",
    "failure_kind",
    "main",
]

log = logging.getLogger("intercept_dispatch.service")

EXIT_NO_DEVICES = 2
"""A worker's exit status when its devices cannot be loaded or its sandbox applied."""
EXIT_HUNG = 3
"""A worker's exit status after a handler hung past its deadline (the supervisor starts a new one)."""
LOCK_RETRY = 0.001
"""Seconds between two tries at a VM's device lock for a statistics or inspection snapshot."""
CUTOFF_SHARE = 0.8
"""A worker cuts its busy connections off this share of the grace period after being told to stop."""
SERVICE_CAPABILITIES = Capability.GUEST_MEMORY
"""What the service accepts, in its HELLO_REPLY: guest memory regions."""


def describe_ports(ranges: Sequence[PortRange]) -> str:
    """``0x60 rw, 0x70-0x71 rw``: port ranges for a log line."""
    access = {1: "r", 2: "w", 3: "rw"}
    return ", ".join(f"{r.first:#x}{f'-{r.last:#x}' if r.last != r.first else ''} {access[r.access]}" for r in ranges)


def _accepts(function: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _about(name: str, error: BaseException) -> str:
    # A transport's errors already begin with the connection's name; say it once.
    text = str(error)
    return text if text.startswith(name) else f"{name}: {text}"


class VmDevices:
    """One VM's devices and dispatcher: the router ``make_router`` makes (called once here), counted per handler.

    ``vm`` is the VM's id (its partition): every frame of its connections
    must carry it. ``on_hung`` is called (with a description) when a
    synchronous handler hangs past ``deadline``. ``max_regions`` and
    ``max_guest_memory`` bound the guest memory the VM's connections may map.
    """

    def __init__(
        self,
        vm: int,
        make_router: Callable[[], Router],
        *,
        deadline: float | None = 5.0,
        grace: float = 5.0,
        on_hung: Callable[[str], None] | None = None,
        max_regions: int = MAX_REGIONS,
        max_guest_memory: int = MAX_BYTES,
    ) -> None:
        self.vm = vm
        self.router = make_router()
        self.ports = self.router.port_ranges()
        served, self.handlers = instrument(self.router)
        options: dict[str, Any] = {}
        if on_hung is not None and _accepts(Dispatcher, "on_hung"):
            options["on_hung"] = on_hung
        self.dispatcher = Dispatcher(served, deadline=deadline, **options)
        self.grace = grace
        self.cutoff = grace
        """Seconds after :meth:`stop` that connections still busy are cut off (a worker: a little under ``grace``)."""
        self.announcement = encode_announcement(self.ports)
        self.latency = LatencySamples()
        self.budget = RegionBudget(max_regions, max_guest_memory)
        """The guest memory this VM may map, over all its connections."""
        self.connections_total = 0
        self.stopping = False
        self._live: set[anyio.CancelScope] = set()
        self._serve_partition = _accepts(self.dispatcher.serve, "partition")

    @property
    def connections_open(self) -> int:
        return len(self._live)

    def stats_part(self) -> dict[str, Any]:
        """This VM's part of the statistics document (``report.vm_part``)."""
        connections = {"open": self.connections_open, "total": self.connections_total}
        return vm_part(
            self.vm, stats=self.dispatcher.stats, latency=self.latency, handlers=self.handlers, connections=connections
        )

    def devices(self) -> list[dict[str, Any]]:
        """This VM's part of the inspection document (``report.vm_devices``)."""
        return vm_devices(self.handlers)

    async def locked(self, build: Callable[[], dict[str, Any] | list[dict[str, Any]]]) -> Any:
        """``build()`` run holding the VM's device lock: a snapshot taken between two handler calls.

        The lock is tried, not waited for, so that the event loop keeps
        running (the watchdog among it) while a handler holds it.
        """
        lock = self.dispatcher.lock
        while not lock.acquire(blocking=False):
            await anyio.sleep(LOCK_RETRY)
        try:
            return build()
        finally:
            lock.release()

    def stop(self) -> None:
        """Stop reading every connection, finish the intercepts already received; cut off after ``grace``."""
        self.stopping = True
        self.dispatcher.stop()
        deadline = anyio.current_time() + self.cutoff
        for scope in self._live:
            scope.deadline = min(scope.deadline, deadline)

    async def serve(self, transport: UnixTransport | Any) -> None:
        """Accept one connection whose HELLO named this VM, then serve it until it ends; closes it."""
        # A connection handed over as the VM stops is still answered (the
        # dispatcher stops it reading), within the grace period.
        scope = anyio.CancelScope(deadline=anyio.current_time() + self.cutoff if self.stopping else math.inf)
        self._live.add(scope)
        self.connections_total += 1
        name = transport.name
        try:
            with scope:
                await accept(transport, self.vm, capabilities=SERVICE_CAPABILITIES, then=self.announcement)
                log.debug("%s: serving VM %d", name, self.vm)
                transport.latency = self.latency
                served = with_shared_memory(transport, self.budget, lock=self.dispatcher.lock)
                if self._serve_partition:
                    await self.dispatcher.serve(served, partition=self.vm)
                else:
                    await self.dispatcher.serve(served)
        except TransportError as error:
            log.debug("%s", _about(name, error))
        except Exception:
            # A bug, not a connection problem; it still must not end the VM.
            log.exception("%s: failed", name)
        finally:
            self._live.discard(scope)
            with anyio.CancelScope(shield=True):
                await transport.aclose()
        if scope.cancelled_caught:
            log.warning("%s: closed with intercepts unanswered after the %g s grace period", name, self.grace)
        else:
            log.debug("%s: closed", name)


# The log, as the service and each worker write it (the worker cannot import the server: it is imported by it).

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""How each log line looks: time, level, logger, message (a worker's messages start with its VM)."""

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


def configure_logging(level: str, *, prefix: str | None = None, rate: int = DEFAULT_LOG_RATE) -> RateLimit:
    """Log to stderr at ``level``, repeated failures rate-limited; return the limiter (to flush).

    ``prefix`` starts every message (a worker's ``VM 3``); ``rate`` caps the lines per second (0: no cap).
    """
    handler = logging.StreamHandler(sys.stderr)
    shown = (
        LOG_FORMAT if prefix is None else LOG_FORMAT.replace("%(message)s", prefix.replace("%", "%%") + ": %(message)s")
    )
    handler.setFormatter(logging.Formatter(shown))
    limiter = RateLimit(handler.handle, key=failure_kind, max_rate=rate)
    handler.addFilter(limiter)
    root = logging.getLogger()
    for previous in [h for h in root.handlers if any(isinstance(f, RateLimit) for f in h.filters)]:
        root.removeHandler(previous)  # a second main() in one process replaces the first one's handler
    root.addHandler(handler)
    root.setLevel(level)
    return limiter


# The worker process.


class _Worker:
    def __init__(self, channel: Channel, settings: dict[str, Any]) -> None:
        self.channel = channel
        self.settings = settings
        self.vm_id: int = settings["vm"]
        self.vm: VmDevices | None = None

    def load(self) -> VmDevices:
        add_device_paths(self.settings.get("device_paths", []))
        loader = DeviceLoader(self.settings["devices"], allow_shared=False)
        grace = float(self.settings.get("grace", 5.0))
        vm = VmDevices(
            self.vm_id,
            loader.router,
            deadline=self.settings.get("deadline"),
            grace=grace,
            on_hung=self.hung,
            max_regions=int(self.settings.get("max_regions", MAX_REGIONS)),
            max_guest_memory=int(self.settings.get("max_guest_memory", MAX_BYTES)),
        )
        # The supervisor kills a worker still running ``grace`` seconds after telling it to stop:
        # cut the connections off a little earlier, so that they close cleanly and say why.
        vm.cutoff = grace * CUTOFF_SHARE
        return vm

    def hung(self, what: str) -> None:
        # Called where the watchdog runs; the worker cannot trust its devices any more.
        log.error("%s; this worker exits so that a new one serves the VM's next connection", what)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(EXIT_HUNG)

    async def serve(self) -> None:
        vm = self.vm
        assert vm is not None
        async with anyio.create_task_group() as connections, anyio.create_task_group() as listening:
            listening.start_soon(self._watch_sigterm, listening.cancel_scope)
            try:
                while not vm.stopping:
                    message, fds = await self.channel.receive()
                    await self.answer(message, fds, connections)
            except ChannelClosedError:
                log.warning("the supervisor has gone; stopping")
                vm.stop()
            except ChannelError as error:
                log.error("%s; stopping", error)
                vm.stop()
            listening.cancel_scope.cancel()

    async def _watch_sigterm(self, listening: anyio.CancelScope) -> None:
        # systemd may signal the whole control group: a worker stops as gracefully as when told to.
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                assert self.vm is not None
                log.debug("SIGTERM: stopping; finishing the intercepts in flight")
                self.vm.stop()
                listening.cancel()
                return

    async def answer(self, message: dict[str, Any], fds: list[int], connections: anyio.abc.TaskGroup) -> None:
        vm = self.vm
        assert vm is not None
        op = message["op"]
        if op == "connection" and len(fds) == 1:
            sock = socket.socket(fileno=fds[0])
            transport = UnixTransport(sock, name=str(message.get("name", f"connection fd {fds[0]}")))
            connections.start_soon(self._serve_connection, transport, int(message.get("id", 0)))
            return
        for fd in fds:
            os.close(fd)
        if op == "stats":
            part = await vm.locked(vm.stats_part)
            await self.channel.send({"op": "reply", "id": message.get("id"), "part": part})
        elif op == "inspect":
            devices = await vm.locked(vm.devices)
            await self.channel.send({"op": "reply", "id": message.get("id"), "vm": vm.vm, "devices": devices})
        elif op == "stop":
            log.debug("stopping; finishing the intercepts in flight")
            vm.stop()
        else:
            log.warning("ignored a message from the supervisor: %s", op)

    async def _serve_connection(self, transport: UnixTransport, number: int) -> None:
        vm = self.vm
        assert vm is not None
        try:
            await vm.serve(transport)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(ChannelError):
                await self.channel.send({"op": "closed", "id": number})


def _apply_sandbox(settings: dict[str, Any]) -> None:
    limits = settings.get("limits")
    if limits is None:
        return
    # glibc loads libgcc_s on the first thread exit (to unwind it); under the filter that open would
    # fail and abort the process. Loaded now, it is found in memory then.
    with contextlib.suppress(OSError):
        ctypes.CDLL(ctypes.util.find_library("gcc_s") or "libgcc_s.so.1")
    apply_sandbox(SandboxLimits.from_json(limits))


async def _run(sock: socket.socket) -> int:
    channel = Channel(sock, name="supervisor channel")
    try:
        message, fds = await channel.receive()
    except ChannelError as error:
        log.error("worker: no start message from the supervisor: %s", error)
        return EXIT_NO_DEVICES
    for fd in fds:
        os.close(fd)
    if message.get("op") != "start":
        log.error("worker: the supervisor's first message is %r, not start", message.get("op"))
        return EXIT_NO_DEVICES
    probe = bool(message.get("probe"))
    vm = message.get("vm") if not probe else 0
    limiter = configure_logging(
        message.get("log_level", "INFO"),
        prefix="device check" if probe else f"VM {vm}",
        rate=int(message.get("log_rate", DEFAULT_LOG_RATE)),
    )
    try:
        return await _serve(channel, message, probe=probe, vm=vm, limiter=limiter)
    finally:
        limiter.flush(everything=True)


async def _serve(channel: Channel, message: dict[str, Any], *, probe: bool, vm: Any, limiter: RateLimit) -> int:
    worker = _Worker(channel, {**message, "vm": vm})
    try:
        worker.vm = worker.load()
        _apply_sandbox(message)  # the device check too: a sandbox that cannot be applied stops the start
    except (DispatchError, ValueError, ImportError, OSError) as error:
        with contextlib.suppress(ChannelError):
            await channel.send({"op": "failed", "error": str(error)})
        return EXIT_NO_DEVICES
    ports = describe_ports(worker.vm.ports)
    await channel.send({"op": "ready", "ports": ports, "pid": os.getpid()})
    if probe:
        return 0
    log.debug("serving (pid %d); ports claimed: %s", os.getpid(), ports or "none")

    async def flush_summaries() -> None:
        while True:
            await anyio.sleep(1)
            limiter.flush()

    async with anyio.create_task_group() as tg:
        tg.start_soon(flush_summaries)
        await worker.serve()
        tg.cancel_scope.cancel()
    channel.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The worker process: ``python -P -m transports.service.worker CHANNEL_FD [BACKEND]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 2 or not args[0].isdigit():
        print("usage: python -P -m transports.service.worker CHANNEL_FD [BACKEND]", file=sys.stderr)
        return EXIT_NO_DEVICES
    # Ctrl-C reaches the whole process group: the supervisor decides how its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(args[0]))
    backend = args[1] if len(args) > 1 else "asyncio"
    run = functools.partial(_run, sock)
    if backend == "uvloop":
        deny_io_uring()  # before the loop starts: libuv would set up an io_uring the filter then breaks
        return anyio.run(run, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(run, backend=backend)


if __name__ == "__main__":
    sys.exit(main())
