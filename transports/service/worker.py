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
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel

from dispatcher import (
    Acquire,
    Dispatcher,
    DispatchError,
    FrameError,
    PortRange,
    Router,
    Transport,
    TransportError,
    encode_announcement,
)
from dispatcher.guest import Guest
from dispatcher.hello import Capability
from dispatcher.irq import device_lines
from dispatcher.lifecycle import Assembler, LifecycleReply, LifecycleRequest, LifecycleStatus, Verb, encode_reply
from dispatcher.recorder import Recorder
from dispatcher.trace import TraceWriter, new_metadata
from dispatcher.transport import InlineAnswer
from dispatcher.wire import LIFECYCLE_REQUEST, Offset, frame_ids, message_type

from ..latency import LatencySamples
from ..shared_memory import MAX_BYTES, MAX_REGIONS, RegionBudget, with_shared_memory
from ..unix import UnixTransport
from .config import record_path
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
    "LifecycleTransport",
    "StateFileError",
    "VmDevices",
    "VmLifecycle",
    "configure_logging",
    "describe_ports",
    "failure_kind",
    "main",
    "open_recording",
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
SERVICE_CAPABILITIES = Capability.GUEST_MEMORY | Capability.LIFECYCLE
"""What the service accepts, in its HELLO_REPLY: guest memory regions and lifecycle requests."""


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


# Lifecycle verbs (dispatcher.lifecycle): PAUSE's gate, and the verbs run on a VM's devices.


class StateFileError(DispatchError):
    """A VM's state file (``serve --state-dir``) that cannot be restored: ``str()`` names the file and,
    when its content is at fault, the device and the field. The VM is not served until it is moved away."""

    def __init__(self, path: str, problem: object) -> None:
        text = str(problem)
        super().__init__(text if path in text else f"state file {path}: {text}")
        self.path = path


_LOCKED_VERBS = frozenset({Verb.RESET, Verb.SAVE, Verb.RESTORE})
_REQUEST_TYPE = LIFECYCLE_REQUEST.to_bytes(4, "little")  # how a lifecycle request's frame begins


def _device_state() -> Any:
    # The device state API, imported when a verb first needs it.
    from dispatcher import device_state

    return device_state


class VmLifecycle:
    """One VM's lifecycle: whether it is paused (and the intercepts waiting meanwhile), and the verbs.

    ``router`` is the VM's own router (its device objects), ``lock`` its
    ``Dispatcher.lock``. Verbs that touch devices (RESET, SAVE, RESTORE) run
    holding the lock, between two handler calls. PAUSE holds back every
    intercept read afterwards on every connection of the VM, in order, until
    RESUME; no thread blocks meanwhile, so the connections go on reading
    (a RESUME among them). ``release`` is called on the event loop once a
    RELEASE has been answered.
    """

    def __init__(self, vm: int, router: Router, lock: Any, *, release: Callable[[], None]) -> None:
        self.vm = vm
        self.router = router
        self.lock = lock
        self.release = release
        self.paused = False
        self.released = False
        self.gate = threading.Lock()
        """Guards ``paused`` and every connection's held intercepts."""
        self.connections: set[LifecycleTransport] = set()

    def save(self) -> str:
        """The VM's device state document as JSON text, taken holding the VM's lock."""
        state = _device_state()
        with self.lock:
            document = state.save_devices(self.router)
        return str(state.dump_state(document))

    def restore(self, text: str, *, source: str) -> None:
        """Restore the document ``text`` (from ``source``, for errors); StateError and nothing changed if it cannot."""
        state = _device_state()
        document = state.load_state(text, source=source)
        with self.lock:
            state.restore_devices(self.router, document)

    def handle(self, request: LifecycleRequest) -> tuple[LifecycleReply, bool]:
        """Carry out ``request``; the reply, and whether the VM is to be released once it is sent."""

        def reply(status: LifecycleStatus, document: bytes | str = b"") -> LifecycleReply:
            data = document.encode() if isinstance(document, str) else document
            return LifecycleReply(self.vm, status, request.request_id, data)

        if request.vm != self.vm:
            message = f"partition at offset {int(Offset.PARTITION)} = {request.vm}: this connection is VM {self.vm}"
            return reply(LifecycleStatus.BAD_REQUEST, message), False
        if self.released:
            return reply(LifecycleStatus.UNAVAILABLE, f"VM {self.vm} is being released"), False
        verb = request.verb
        try:
            if verb is Verb.PAUSE:
                with self.gate:
                    self.paused = True
                log.debug("paused: intercepts wait until RESUME")
            elif verb is Verb.RESUME:
                with self.gate:
                    self.paused = False
                    waiting = [connection for connection in self.connections if connection.held]
                for connection in waiting:
                    connection.wake()
                log.debug("resumed")
            elif verb is Verb.RESET:
                state = _device_state()
                with self.lock:
                    state.reset_devices(self.router)
                log.info("devices reset")
            elif verb is Verb.SAVE:
                return reply(LifecycleStatus.OK, self.save()), False
            elif verb is Verb.RESTORE:
                try:
                    text = request.document.decode()
                except UnicodeDecodeError as error:
                    return reply(
                        LifecycleStatus.STATE_ERROR, f"the RESTORE document is not UTF-8 (byte {error.start})"
                    ), False
                self.restore(text, source="the RESTORE request")
                log.info("device state restored")
            elif verb is Verb.RELEASE:
                self.released = True
                return reply(LifecycleStatus.OK), True
        except ImportError:
            return reply(LifecycleStatus.UNAVAILABLE, "this service has no device state support"), False
        except (DispatchError, ValueError) as error:
            log.warning("%s refused: %s", verb.name, error)
            return reply(LifecycleStatus.STATE_ERROR, str(error)), False
        return reply(LifecycleStatus.OK), False


class LifecycleTransport(Transport):
    """A VMM connection whose lifecycle requests are answered here and whose intercepts PAUSE holds back.

    Everything else passes through to ``transport`` unchanged. Inline, the
    requests are carried out on the transport's thread, in stream order
    among the intercepts; intercepts held by PAUSE are handed to the
    dispatcher's loop (through :meth:`receive_batch`) on RESUME.
    """

    def __init__(self, transport: Transport, lifecycle: VmLifecycle, *, recorder: Recorder | None = None) -> None:
        self.transport = transport
        self.lifecycle = lifecycle
        self.recorder = recorder
        self.name = str(getattr(transport, "name", "a connection"))
        # What the dispatcher asks of a transport, as the one wrapped has it.
        vars(self).update(stops_reading=transport.stops_reading, answers_inline=transport.answers_inline)
        self.held: list[bytes] = []
        """Intercepts read while the VM was paused (under ``lifecycle.gate``)."""
        self._assembler = Assembler()
        self._pending: list[bytes] = []
        self._inline = False
        self._woken = anyio.Event()
        self._token = anyio.lowlevel.current_token()
        self._loop_thread = threading.get_ident()
        lifecycle.connections.add(self)

    @property
    def guest(self) -> Guest | None:
        """The wrapped transport's guest memory (what string I/O reads and writes there recorded, with ``recorder``)."""
        guest = self.transport.guest
        return guest if guest is None or self.recorder is None else self.recorder.guest(guest)

    def wake(self) -> None:
        """Hand the held intercepts to the loop (after RESUME); from any thread."""
        if threading.get_ident() == self._loop_thread:
            self._woken.set()
            return
        with contextlib.suppress(anyio.RunFinishedError, RuntimeError):
            anyio.from_thread.run_sync(self._woken.set, token=self._token)

    def _take_held(self) -> list[bytes]:
        with self.lifecycle.gate:
            if self.lifecycle.paused or not self.held:
                return []
            frames, self.held = self.held, []
            return frames

    def _hold(self, frames: Sequence[bytes]) -> bool:
        """Keep ``frames`` back if the VM is paused; whether it was."""
        with self.lifecycle.gate:
            if not self.lifecycle.paused:
                return False
            self.held.extend(frames)
            return True

    def _refused(self, frame: bytes, error: FrameError) -> LifecycleReply:
        vm, _ = frame_ids(frame)
        request_id = int.from_bytes(frame[Offset.LIFECYCLE_REQUEST_ID : Offset.LIFECYCLE_REQUEST_ID + 4], "little")
        log.warning("%s: rejected a lifecycle request: %s", self.name, error)
        status = LifecycleStatus.UNKNOWN_VERB if error.field == "verb" else LifecycleStatus.BAD_REQUEST
        return LifecycleReply(vm, status, request_id, str(error).encode())

    def _assemble(self, frame: bytes) -> LifecycleRequest | LifecycleReply | None:
        try:
            return self._assembler.request(frame)
        except FrameError as error:
            return self._refused(frame, error)

    def _release_on_loop(self) -> None:
        if threading.get_ident() == self._loop_thread:
            self.lifecycle.release()
            return
        with contextlib.suppress(anyio.RunFinishedError, RuntimeError):
            anyio.from_thread.run_sync(self.lifecycle.release, token=self._token)

    def _answer_sync(self, frame: bytes) -> list[bytes]:
        # On the transport's thread: the verb runs here, taking the VM's lock as it needs.
        request = self._assemble(frame)
        if request is None:
            return []
        if isinstance(request, LifecycleReply):
            return encode_reply(request)
        reply, release = self.lifecycle.handle(request)
        if release:
            # The reply goes out before this thread reads again; stopping only ends the reading.
            self._release_on_loop()
        return encode_reply(reply)

    async def _answer_async(self, frame: bytes) -> None:
        request = self._assemble(frame)
        if request is None:
            return
        release = False
        if isinstance(request, LifecycleReply):
            reply = request
        elif request.verb in _LOCKED_VERBS:
            # The loop's thread takes the lock without blocking the loop (a handler may hold it).
            await Acquire(self.lifecycle.lock, anyio.lowlevel.checkpoint)
            try:
                reply, release = self.lifecycle.handle(request)
            finally:
                self.lifecycle.lock.release()
        else:
            reply, release = self.lifecycle.handle(request)
        await self.transport.send_batch(encode_reply(reply))
        if release:
            self.lifecycle.release()

    def start_inline(self, answer: InlineAnswer) -> None:
        """Answer inline as the wrapped transport does; lifecycle requests are carried out on its thread."""
        self._inline = True

        lifecycle = self.lifecycle
        request = _REQUEST_TYPE

        def answer_around_requests(frames: Sequence[bytes]) -> list[bytes]:
            # The common case, costing one slice and compare per frame: running, and no request among them.
            if not lifecycle.paused:
                for frame in frames:
                    if frame[:4] == request:
                        break
                else:
                    return answer(frames)
            out: list[bytes] = []
            start, count = 0, len(frames)
            while start < count:
                if message_type(frames[start]) == LIFECYCLE_REQUEST:
                    out += self._answer_sync(frames[start])
                    start += 1
                    continue
                end = start + 1
                while end < count and message_type(frames[end]) != LIFECYCLE_REQUEST:
                    end += 1
                run = frames[start:end]
                if not (self.lifecycle.paused and self._hold(run)):
                    out += answer(run)
                start = end
            return out

        self.transport.start_inline(answer_around_requests)

    async def _read_or_wake(self) -> list[bytes] | None:
        """The wrapped transport's next batch, or None when woken (held intercepts to hand over) first."""
        got: list[list[bytes]] = []
        failed: list[Exception] = []
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                try:
                    got.append(await self.transport.receive_batch())
                except Exception as error:
                    failed.append(error)  # raised as it is below, not wrapped in an exception group
                tg.cancel_scope.cancel()

            async def woken() -> None:
                await self._woken.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(read)
            tg.start_soon(woken)
        if failed:
            raise failed[0]
        if self._woken.is_set():
            self._woken = anyio.Event()
        return got[0] if got else None

    async def receive_batch(self) -> list[bytes]:
        """Frames for the dispatcher: intercepts (held ones after RESUME); lifecycle requests are answered here."""
        while True:
            released = self._take_held()
            if released:
                return released
            if self._inline:
                frames = await self._read_or_wake()
                if frames is None:
                    continue
                return frames
            if self._pending:
                frames, self._pending = self._pending, []
            else:
                read = await (self._read_or_wake() if self.held else self.transport.receive_batch())
                if read is None:
                    continue
                frames = read
            if not frames:
                return []
            passed: list[bytes] = []
            for index, frame in enumerate(frames):
                if message_type(frame) == LIFECYCLE_REQUEST:
                    if passed:
                        # What came before the request is dispatched first.
                        self._pending = frames[index:]
                        break
                    await self._answer_async(frame)
                elif not self._hold((frame,)):
                    passed.append(frame)
            if passed:
                return passed

    async def send_batch(self, frames: Sequence[bytes]) -> None:
        """Send on the wrapped transport."""
        await self.transport.send_batch(frames)

    def stop_reading(self) -> None:
        """Stop the wrapped transport reading."""
        self.transport.stop_reading()

    async def aclose(self) -> None:
        """Close the wrapped transport; the VM forgets this connection (and what it held)."""
        self.lifecycle.connections.discard(self)
        await self.transport.aclose()


def open_recording(base: str, vm: int, *, devices: Sequence[str], device_paths: Sequence[str] = ()) -> Recorder:
    """A recorder of VM ``vm`` for ``serve --record BASE``, writing a new file (:func:`.config.record_path`).

    Never overwrites: a name already taken moves on to the next attempt's.
    The devices run on real time, so the metadata says ``clock: real``.
    """
    metadata = new_metadata(
        "serve",
        machine=devices[0] if len(devices) == 1 else None,
        partition=vm,
        clock="real",
        devices=list(devices),
        device_paths=list(device_paths),
    )
    for attempt in range(1000):
        path = record_path(base, vm, attempt)
        try:
            writer = TraceWriter(path, metadata, exclusive=True)
        except FileExistsError:
            continue
        except OSError as error:
            raise ValueError(f"cannot record to {path}: {error.strerror or error}") from None
        log.info("VM %d: recording to %s", vm, path)
        return Recorder(writer)
    raise OSError(f"{record_path(base, vm)}: 1000 recordings of VM {vm} exist already")


class VmDevices:
    """One VM's devices and dispatcher: the router ``make_router`` makes (called once here), counted per handler.

    ``vm`` is the VM's id (its partition): every frame of its connections
    must carry it. ``on_hung`` is called (with a description) when a
    synchronous handler hangs past ``deadline``. ``max_regions`` and
    ``max_guest_memory`` bound the guest memory the VM's connections may map.
    ``recorder`` (``serve --record``) records everything the VM's devices are asked.
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
        recorder: Recorder | None = None,
    ) -> None:
        self.vm = vm
        self.router = make_router()
        self.ports = self.router.port_ranges()
        served, self.handlers = instrument(self.router)
        options: dict[str, Any] = {}
        if on_hung is not None and _accepts(Dispatcher, "on_hung"):
            options["on_hung"] = on_hung
        self.recorder = recorder
        if recorder is not None:
            options["observer"] = recorder
            for line in device_lines(self.router):
                recorder.tap(line)  # the devices' interrupt lines: their edges are in the trace too
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
        self.on_release: Callable[[], None] | None = None
        """Called (on the event loop) once a RELEASE has been answered: whoever keeps the VM forgets it."""
        self.lifecycle = VmLifecycle(vm, self.router, self.dispatcher.lock, release=self.release)
        """PAUSE's state and the lifecycle verbs, on this VM's devices."""
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

    @property
    def released(self) -> bool:
        """True once a RELEASE has been answered: the devices are being dropped."""
        return self.lifecycle.released

    def release(self) -> None:
        """Drop the VM (after a RELEASE): stop serving its connections, then tell whoever keeps it."""
        self.lifecycle.released = True
        log.info("VM %d released: its devices are dropped", self.vm)
        self.stop()
        if self.on_release is not None:
            self.on_release()

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
        served: LifecycleTransport | None = None
        if self.released:
            # Handed over as the VM was released: closed unanswered; the VMM's next try finds a new VM.
            self._live.discard(scope)
            log.debug("%s: closed, VM %d is released", name, self.vm)
            await transport.aclose()
            return
        try:
            with scope:
                await accept(transport, self.vm, capabilities=SERVICE_CAPABILITIES, then=self.announcement)
                log.debug("%s: serving VM %d", name, self.vm)
                transport.latency = self.latency
                served = LifecycleTransport(
                    with_shared_memory(transport, self.budget, lock=self.dispatcher.lock),
                    self.lifecycle,
                    recorder=self.recorder,
                )
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
            if served is not None:
                self.lifecycle.connections.discard(served)
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
        self.save_on_stop = bool(settings.get("save_on_stop"))
        """``serve --state-dir``: once stopped, send the VM's device state to the supervisor, which keeps it."""
        self._listening: anyio.CancelScope | None = None

    def load(self) -> VmDevices:
        add_device_paths(self.settings.get("device_paths", []))
        loader = DeviceLoader(self.settings["devices"], allow_shared=False)
        grace = float(self.settings.get("grace", 5.0))
        record = self.settings.get("record")
        recorder = None
        if isinstance(record, str):
            recorder = open_recording(
                record, self.vm_id, devices=self.settings["devices"], device_paths=self.settings.get("device_paths", [])
            )
        vm = VmDevices(
            self.vm_id,
            loader.router,
            deadline=self.settings.get("deadline"),
            grace=grace,
            on_hung=self.hung,
            max_regions=int(self.settings.get("max_regions", MAX_REGIONS)),
            max_guest_memory=int(self.settings.get("max_guest_memory", MAX_BYTES)),
            recorder=recorder,
        )
        # The supervisor kills a worker still running ``grace`` seconds after telling it to stop:
        # cut the connections off a little earlier, so that they close cleanly and say why.
        vm.cutoff = grace * CUTOFF_SHARE
        vm.on_release = self.released
        state = self.settings.get("state")
        if isinstance(state, str):
            # A state file the supervisor read (serve --state-dir): restored before any HELLO is answered.
            path = str(self.settings.get("state_path", "the saved state"))
            try:
                vm.lifecycle.restore(state, source=f"state file {path}")
            except ImportError:
                raise StateFileError(path, "this service has no device state support") from None
            except DispatchError as error:
                raise StateFileError(path, error) from None
            log.info("devices restored from %s", path)
        return vm

    def released(self) -> None:
        # After a RELEASE: stop listening to the supervisor; serve() then says so and the worker exits.
        if self._listening is not None:
            self._listening.cancel()

    def hung(self, what: str) -> None:
        # Called where the watchdog runs; the worker cannot trust its devices any more.
        log.error("%s; this worker exits so that a new one serves the VM's next connection", what)
        if self.vm is not None and self.vm.recorder is not None:
            # The trace ends with the intercept that hung (no end record: the worker did not stop cleanly).
            with contextlib.suppress(Exception):
                self.vm.recorder.flush()
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(EXIT_HUNG)

    async def serve(self) -> None:
        vm = self.vm
        assert vm is not None
        async with anyio.create_task_group() as connections:
            async with anyio.create_task_group() as listening:
                self._listening = listening.cancel_scope
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
            if vm.released:
                # The supervisor forgets the VM (and its saved state) and hands it no more connections.
                with contextlib.suppress(ChannelError):
                    await self.channel.send({"op": "released"})
        if self.save_on_stop and not vm.released:
            await self._send_state(vm)

    async def _send_state(self, vm: VmDevices) -> None:
        # Every connection has ended: the state holds the effect of every intercept answered.
        await Acquire(vm.dispatcher.lock, anyio.lowlevel.checkpoint)
        try:
            text = vm.lifecycle.save()
        except ImportError:
            log.error("cannot save the device state: this service has no device state support")
            return
        except (DispatchError, ValueError) as error:
            log.error("cannot save the device state: %s", error)
            return
        finally:
            vm.dispatcher.lock.release()
        with contextlib.suppress(ChannelError):
            await self.channel.send({"op": "state", "state": text})

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
            await channel.send({"op": "failed", "error": str(error), "state": isinstance(error, StateFileError)})
        return EXIT_NO_DEVICES
    ports = describe_ports(worker.vm.ports)
    restored = isinstance(message.get("state"), str)
    await channel.send({"op": "ready", "ports": ports, "pid": os.getpid(), "restored": restored})
    if probe:
        return 0
    log.debug("serving (pid %d); ports claimed: %s", os.getpid(), ports or "none")

    async def flush_summaries() -> None:
        while True:
            await anyio.sleep(1)
            limiter.flush()

    async with anyio.create_task_group() as tg:
        tg.start_soon(flush_summaries)
        try:
            await worker.serve()
        finally:
            if worker.vm.recorder is not None:
                worker.vm.recorder.close()
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
