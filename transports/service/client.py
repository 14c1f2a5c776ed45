"""The VMM's side of a device service connection: what a VMM embeds, and what the tests drive.

::

    async with connect_service("/run/user/1000/intercept-dispatch.sock", vm=3) as client:
        print(client.ports)                       # the announced port set
        completion = await client.exchange(frame) # one intercept, one completion

The client opens every connection with a HELLO naming its VM (the
partition every one of its frames carries) and reads the service's
HELLO_REPLY before anything else: a refusal raises
:class:`~dispatcher.SessionRefusedError` with the service's reason, another
major version :class:`~dispatcher.IncompatibleVersionError` naming both.
:func:`connect_service` also refuses a socket served by a user it does not
trust (:class:`~transports.socket_path.ServerIdentityError`) before sending
anything.

Many VPs may each have an intercept in flight over one connection; a
completion is matched to its VP by (partition, VP index), which is all the
protocol needs because a VP waits for its completion before it runs on.
Frames from VPs that become ready together go out in one write.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

from dispatcher import (
    ANNOUNCEMENT,
    COMPLETION,
    AccessInfo,
    AccessType,
    Completion,
    DispatchError,
    FrameError,
    IoPortInterceptMessage,
    PortRange,
    Transport,
    TransportClosedError,
    TransportError,
    decode_announcement,
    decode_completion,
)
from dispatcher.errors import IncompatibleVersionError, SessionRefusedError
from dispatcher.hello import Capability, Hello, HelloReply, HelloStatus, decode_hello_reply, encode_hello, version_text
from dispatcher.lifecycle import (
    Assembler,
    LifecycleError,
    LifecycleReply,
    LifecycleRequest,
    LifecycleStatus,
    Verb,
    encode_request,
)
from dispatcher.wire import HELLO_REPLY, LIFECYCLE_REPLY, frame_ids, message_type

from ..pipe import PipeTransport
from ..socket_path import allowed_server_uids, check_server
from ..unix import UnixTransport, connect_unix

__all__ = [
    "InterceptLostError",
    "Reconnect",
    "ServiceClient",
    "check_hello_reply",
    "connect_service",
    "io_intercept",
    "open_session",
    "spawn_service",
]

log = logging.getLogger("intercept_dispatch.service")


def io_intercept(
    port: int, size: int, *, write: bool, value: int = 0, vp: int = 0, partition: int = 0, rip: int = 0
) -> bytes:
    """An IN or OUT intercept frame (``in al, dx`` style, one instruction byte), e.g. for a CLI."""
    return IoPortInterceptMessage(
        port_number=port,
        access_type=AccessType.WRITE if write else AccessType.READ,
        access_info=AccessInfo.build(size),
        rax=value & (1 << 8 * size) - 1 if write else 0,
        vp_index=vp,
        source_partition=partition,
        rip=rip,
    ).to_bytes()


_REFUSALS = {
    HelloStatus.REFUSED: "refused VM {vm}",
    HelloStatus.NO_WORKER: "could not start a worker for VM {vm}",
}


def check_hello_reply(frame: bytes, hello: Hello, *, where: str) -> HelloReply:
    """The service's answer to ``hello``, if it accepts; else the typed error saying why.

    ``where`` names the service in errors ("the service at PATH"). Raises
    :class:`~dispatcher.IncompatibleVersionError` (naming both versions) when
    the service speaks another major version, :class:`~dispatcher.SessionRefusedError`
    (with the service's reason) when it refuses, and
    :class:`~dispatcher.TransportError` when ``frame`` is not a readable
    HELLO_REPLY for the HELLO's VM.
    """
    kind = message_type(frame)
    ours = (hello.major, hello.minor)
    if kind != HELLO_REPLY:
        raise TransportError(
            f"{where} sent a frame of type {kind:#x} where its HELLO_REPLY was due "
            f"(does it speak session version {version_text(*ours)}?)"
        )
    try:
        reply = decode_hello_reply(frame)
    except FrameError as error:
        raise TransportError(f"{where} sent a HELLO_REPLY that cannot be read: {error}") from error
    theirs = (reply.major, reply.minor)
    if reply.major != hello.major:
        raise IncompatibleVersionError(
            f"{where} speaks session version {version_text(*theirs)}, this client {version_text(*ours)} "
            "(the major versions must match)",
            ours=ours,
            theirs=theirs,
        )
    if reply.status is HelloStatus.INCOMPATIBLE_VERSION:
        raise IncompatibleVersionError(
            f"{where} refused session version {version_text(*ours)}: {reply.reason or 'no reason given'}",
            ours=ours,
            theirs=theirs,
        )
    if not reply.accepted:
        what = _REFUSALS[reply.status].format(vm=hello.vm)
        raise SessionRefusedError(
            f"{where} {what}: {reply.reason or 'no reason given'}",
            status=reply.status,
            reason=reply.reason,
            vm=hello.vm,
        )
    if reply.vm != hello.vm:
        raise TransportError(f"{where} accepted VM {reply.vm}, but this client's HELLO named VM {hello.vm}")
    return reply


async def _receive_or_end(transport: Transport) -> list[bytes]:
    # A reset (the service closed with our HELLO unread) is an end of stream too.
    try:
        return await transport.receive_batch()
    except TransportClosedError:
        return []


def _default_capabilities(transport: Transport) -> Capability:
    # A UNIX socket can carry guest memory descriptors; pipes cannot.
    memory = Capability.GUEST_MEMORY if isinstance(transport, UnixTransport) else Capability.NONE
    return memory | Capability.LIFECYCLE


class InterceptLostError(TransportClosedError):
    """A VP's intercept that will get no completion: the connection ended and could not be opened again
    (after :attr:`Reconnect.attempts` tries), or :attr:`Reconnect.resend` says it must not be sent again.

    ``frame`` is the intercept (None for a client-wide error).
    """

    def __init__(self, message: str, *, frame: bytes | None = None) -> None:
        super().__init__(message)
        self.frame = frame


@dataclass(frozen=True, slots=True)
class Reconnect:
    """How a :class:`ServiceClient` opens its session again when the connection ends (a service restart).

    Tries ``attempts`` times, waiting ``initial_delay`` seconds before the
    first and twice as long before each next, at most ``max_delay``. Once
    a new session is open (HELLO as the same VM, the port announcement), the
    intercepts that had no completion are sent again, in the order they
    were first sent, except those ``resend`` (given an intercept frame)
    refuses: their VPs get :class:`InterceptLostError`, as every VP waiting
    does when the attempts run out. ``connect`` opens a new transport
    (:func:`connect_service` supplies it).
    """

    attempts: int = 10
    initial_delay: float = 0.05
    max_delay: float = 2.0
    resend: Callable[[bytes], bool] | None = None
    connect: Callable[[], Awaitable[Transport]] | None = None

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {self.attempts}")
        if not 0 <= self.initial_delay <= self.max_delay:
            raise ValueError(f"delays must satisfy 0 <= initial_delay <= max_delay, not {self.initial_delay}, "
                             f"{self.max_delay}")  # fmt: skip

    def delays(self) -> list[float]:
        """The wait before each attempt: exponential from ``initial_delay``, capped at ``max_delay``."""
        out, delay = [], self.initial_delay
        for _ in range(self.attempts):
            out.append(delay)
            delay = min(delay * 2 if delay else self.max_delay, self.max_delay)
        return out


async def open_session(
    transport: Transport,
    *,
    vm: int = 0,
    capabilities: Capability | None = None,
    where: str = "the service",
    timeout: float = 5.0,
) -> tuple[HelloReply, list[PortRange]]:
    """The opening for a VMM that reads the transport itself: HELLO as ``vm``, the reply, the announcement.

    Returns the service's HELLO_REPLY and the port ranges it announced.
    ``capabilities`` default as :class:`ServiceClient`'s; ``where`` names the
    service in errors. Raises what :func:`check_hello_reply` raises, and
    :class:`~dispatcher.TransportError` when the service does not answer
    within ``timeout`` seconds or closes first.
    """
    hello = Hello(vm, capabilities=_default_capabilities(transport) if capabilities is None else capabilities)
    reply: HelloReply | None = None
    ranges: list[PortRange] = []
    with anyio.move_on_after(timeout):
        # A refusal may already have closed the connection: the reader then finds the reply.
        with contextlib.suppress(TransportError):
            await transport.send_batch([encode_hello(hello)])
        while frames := await _receive_or_end(transport):
            for frame in frames:
                if reply is None:
                    reply = check_hello_reply(frame, hello, where=where)
                    continue
                kind = message_type(frame)
                if kind != ANNOUNCEMENT:
                    raise TransportError(f"{where} sent a frame of type {kind:#x} before its port announcement")
                try:
                    part, final = decode_announcement(frame)
                except FrameError as error:
                    raise TransportError(f"{where} sent an announcement that cannot be read: {error}") from error
                ranges.extend(part)
                if final:
                    return reply, ranges
        if reply is None:
            raise TransportClosedError(f"{where} closed the connection without answering the HELLO")
        raise TransportClosedError(f"{where} closed the connection before announcing its ports")
    if reply is None:
        raise TransportError(f"{where} did not answer the HELLO within {timeout:g} s")
    raise TransportError(f"{where} sent no port announcement within {timeout:g} s")


class _Waiter:
    __slots__ = ("completion", "error", "event", "frame", "generation")

    def __init__(self, frame: bytes = b"") -> None:
        self.event = anyio.Event()
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self.frame = frame
        self.generation = -1  # the connection it was last sent on (-1: not sent)

    def result(self) -> Completion:
        if self.error is not None:
            raise self.error
        assert self.completion is not None
        return self.completion


class _LifecycleWaiter:
    __slots__ = ("error", "event", "reply")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reply: LifecycleReply | None = None
        self.error: BaseException | None = None


class ServiceClient:
    """Intercepts out, completions back, over any :class:`~dispatcher.Transport` to a service.

    Use it as an async context manager: entering sends the HELLO for VM
    ``vm`` with ``capabilities`` (by default LIFECYCLE, and GUEST_MEMORY over
    a UNIX socket, which can carry memory descriptors), then waits (up to
    ``announce_timeout`` seconds in all) for the service's HELLO_REPLY and
    port announcement; leaving closes the transport. Entering raises
    :class:`~dispatcher.SessionRefusedError` or
    :class:`~dispatcher.IncompatibleVersionError` as
    :func:`check_hello_reply` says, and :class:`~dispatcher.TransportError`
    if the service does not answer. ``name`` begins every error message
    (default: the transport's name).

    With ``reconnect`` (a :class:`Reconnect` whose ``connect`` opens a new
    transport), a connection that ends after the session opened is opened
    again with backoff and the intercepts without completion are sent
    again (docs/SERVICE.md, "Reconnecting"); lifecycle requests in flight
    then fail with the connection's error. Without it, every VP waiting
    gets :class:`~dispatcher.TransportClosedError`.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        vm: int = 0,
        capabilities: Capability | None = None,
        announce_timeout: float = 5.0,
        name: str | None = None,
        reconnect: Reconnect | None = None,
    ) -> None:
        if reconnect is not None and reconnect.connect is None:
            raise ValueError("reconnect needs a connect function (connect_service supplies one)")
        self.transport = transport
        self.vm = vm
        """The VM this connection is: the partition of its frames."""
        self.capabilities = _default_capabilities(transport) if capabilities is None else capabilities
        """What the HELLO says this client may do."""
        self.hello = Hello(vm, capabilities=self.capabilities)  # ValueError now for a vm out of 64 bits
        """The HELLO this client opens with."""
        self.announce_timeout = announce_timeout
        self.name = name or str(getattr(transport, "name", "the service"))
        """How errors name the service."""
        self.reconnect = reconnect
        """How the session is opened again when the connection ends (None: it is not)."""
        self.reconnects = 0
        """How many times the session has been opened again."""
        self.reply: HelloReply | None = None
        """The service's HELLO_REPLY (its version and capabilities), once it has accepted."""
        self.ports: list[PortRange] = []
        """The port ranges the service claims, as announced."""
        self._announcing: list[PortRange] = []
        self._announced = anyio.Event()
        self._waiting: dict[tuple[int, int], _Waiter] = {}
        self._outbox: list[bytes] = []
        self._flushing = False
        self._error: DispatchError | None = None
        self._ended = False
        self._closing = False
        self._released = False
        self._connected = True
        self._generation = 0
        self._reconnected = anyio.Event()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._lifecycle: dict[int, _LifecycleWaiter] = {}
        self._replies = Assembler()
        self._request_ids = itertools.count(1)

    @property
    def in_flight(self) -> int:
        """Intercepts sent and not yet completed."""
        return len(self._waiting)

    async def exchange(self, frame: bytes) -> Completion:
        """Send one intercept frame and return the completion for its VP.

        Raises ``RuntimeError`` if that VP already has an intercept in flight
        (a real VP cannot), :class:`~dispatcher.TransportClosedError` if the
        connection ends first (with ``reconnect``: :class:`InterceptLostError`
        once it cannot be opened again). If the call is cancelled after
        sending, the VP stays busy until its completion arrives and is
        discarded.
        """
        if self._error is not None:
            raise self._error
        key = frame_ids(frame)  # where the service finds the VP, even of a frame it rejects
        if key in self._waiting:
            raise RuntimeError(f"partition {key[0]}, VP {key[1]:#x} already has an intercept in flight")
        # Once registered, the frame is sent even if this call is cancelled,
        # and the waiter stays registered until its completion arrives.
        waiter = self._waiting[key] = _Waiter(frame)
        await self._submit((waiter,))
        await waiter.event.wait()
        return waiter.result()

    async def exchange_many(self, frames: Sequence[bytes]) -> list[Completion]:
        """Send intercepts for several VPs in one write; return their completions in the same order."""
        if self._error is not None:
            raise self._error
        keys = [frame_ids(frame) for frame in frames]
        if len(set(keys)) != len(keys) or any(key in self._waiting for key in keys):
            raise RuntimeError(f"a VP among partition/VP {keys} already has an intercept in flight")
        waiters = [_Waiter(frame) for frame in frames]
        self._waiting.update(zip(keys, waiters, strict=True))
        await self._submit(waiters)
        for waiter in waiters:
            await waiter.event.wait()
        return [waiter.result() for waiter in waiters]

    async def _submit(self, waiters: Sequence[_Waiter], frames: Sequence[bytes] = ()) -> None:
        if not self._connected:
            return  # reconnecting: the new connection sends every waiter's frame
        for waiter in waiters:
            waiter.generation = self._generation
            self._outbox.append(waiter.frame)
        self._outbox.extend(frames)
        if self._flushing:
            return  # the task already flushing sends these with its own
        self._flushing = True
        try:
            # A write, once begun, must finish for every frame in it.
            with anyio.CancelScope(shield=True):
                if len(self._waiting) > len(waiters):
                    # Other VPs are in flight and may become ready in this same
                    # turn of the loop: let them add their frames to this write.
                    await anyio.lowlevel.cancel_shielded_checkpoint()
                while self._outbox:
                    batch, self._outbox = self._outbox, []
                    await self.transport.send_batch(batch)
        except TransportError as error:
            self._outbox = []
            if self.reconnect is None or self._closing or self._released:
                self._fail_all(error)
                raise
            # The reader finds the connection's end and opens it again; these frames go again then.
            with anyio.CancelScope(shield=True):
                await self.transport.aclose()
        finally:
            self._flushing = False

    # Lifecycle requests.

    async def request(self, verb: Verb, document: bytes = b"") -> LifecycleReply:
        """Send one lifecycle request for this client's VM; the service's OK reply.

        Raises :class:`~dispatcher.lifecycle.LifecycleError` naming the verb
        and the service's message when it answers anything but OK (or does
        not answer lifecycle requests at all), and
        :class:`~dispatcher.TransportClosedError` if the connection ends first.
        """
        if self._error is not None:
            raise self._error
        if not self._connected:
            await self._reconnected.wait()
            if self._error is not None:
                raise self._error
        if self.reply is not None and not self.reply.capabilities & Capability.LIFECYCLE:
            raise LifecycleError(
                f"{self.name} does not answer lifecycle requests ({verb.name})",
                status=LifecycleStatus.UNAVAILABLE,
                verb=verb,
            )
        request_id = next(self._request_ids) & 0xFFFF_FFFF
        waiter = self._lifecycle[request_id] = _LifecycleWaiter()
        frames = encode_request(LifecycleRequest(self.vm, verb, request_id, document))
        await self._submit((), frames)
        await waiter.event.wait()
        if waiter.error is not None:
            raise waiter.error
        reply = waiter.reply
        assert reply is not None
        if reply.status is not LifecycleStatus.OK:
            raise LifecycleError(
                f"{self.name} refused {verb.name} ({reply.status.name}): {reply.message or 'no reason given'}",
                status=reply.status,
                verb=verb,
            )
        if verb is Verb.RELEASE:
            self._released = True  # the service closes the connection next: not to be opened again
        return reply

    async def reset(self) -> None:
        """RESET: every device of the VM to its power-on state."""
        await self.request(Verb.RESET)

    async def pause(self) -> None:
        """PAUSE: no handler of the VM runs until :meth:`resume`; intercepts sent meanwhile wait, in order."""
        await self.request(Verb.PAUSE)

    async def resume(self) -> None:
        """RESUME: the intercepts held since :meth:`pause` are dispatched."""
        await self.request(Verb.RESUME)

    async def save(self) -> dict[str, Any]:
        """SAVE: the VM's device state document (as ``dispatcher.device_state.save_devices`` makes it)."""
        reply = await self.request(Verb.SAVE)
        try:
            document = json.loads(reply.document)
        except ValueError as error:
            raise TransportError(f"{self.name} answered SAVE with a document that is not JSON: {error}") from None
        if not isinstance(document, dict):
            raise TransportError(f"{self.name} answered SAVE with JSON that is not an object")
        return document

    async def restore(self, document: Mapping[str, Any] | str | bytes) -> None:
        """RESTORE: replace the VM's device state with ``document`` (all or nothing).

        A document the service cannot restore raises
        :class:`~dispatcher.lifecycle.LifecycleError` (STATE_ERROR) whose
        message names the device and the field; the VM is then untouched.
        """
        if isinstance(document, Mapping):
            data = json.dumps(document, indent=1).encode()
        else:
            data = document.encode() if isinstance(document, str) else bytes(document)
        await self.request(Verb.RESTORE, data)

    async def release(self) -> None:
        """RELEASE: the VM's devices (and any state the service kept for it) are dropped; the connection ends."""
        await self.request(Verb.RELEASE)

    # Receiving.

    async def _receive(self) -> None:
        while True:
            error = await self._read()
            if (
                self.reconnect is None
                or self._closing
                or self._released
                or self.reply is None
                or not isinstance(error, TransportError)
            ):
                self._fail_all(error)
                return
            if not await self._open_again(error):
                return

    async def _read(self) -> DispatchError:
        """Read until the connection ends; the error that says how it did."""
        try:
            while frames := await self.transport.receive_batch():
                for frame in frames:
                    self._deliver(frame)
            self._ended = True
            return TransportClosedError(f"{self.name} closed the connection")
        except TransportClosedError as failure:
            # A reset (the service closed with our HELLO unread) is an end of stream too.
            self._ended = True
            return failure
        except DispatchError as failure:
            return failure

    async def _open_again(self, cause: DispatchError) -> bool:
        """Open the session again (backoff, then the HELLO); resend what had no completion. False: gave up."""
        policy = self.reconnect
        assert policy is not None and policy.connect is not None
        connect = policy.connect
        self._connected = False
        self._reconnected = anyio.Event()
        with anyio.CancelScope(shield=True):
            await self.transport.aclose()
        # Lifecycle requests are not sent again: their callers decide.
        self._fail_lifecycle(cause)
        log.warning("%s: %s; opening the session again (%d attempts at most)", self.name, cause, policy.attempts)
        last: BaseException = cause
        for attempt, delay in enumerate(policy.delays(), start=1):
            await anyio.sleep(delay)
            try:
                transport = await connect()
            except (OSError, DispatchError) as error:
                last = error
                continue
            try:
                reply, ports = await open_session(
                    transport, vm=self.vm, capabilities=self.capabilities, where=self.name,
                    timeout=self.announce_timeout,
                )  # fmt: skip
            except IncompatibleVersionError as error:
                with anyio.CancelScope(shield=True):
                    await transport.aclose()
                self._fail_all(error)  # another version: trying again cannot help
                return False
            except DispatchError as error:
                with anyio.CancelScope(shield=True):
                    await transport.aclose()
                last = error
                continue
            if ports != self.ports:
                log.warning("%s: the service now claims other ports than before", self.name)
            self.transport, self.reply, self.ports = transport, reply, ports
            self._replies = Assembler()
            self._ended = False
            self._generation += 1
            self.reconnects += 1
            self._connected = True
            self._reconnected.set()
            again = sorted(
                (w for w in self._waiting.values() if w.generation != self._generation), key=lambda w: w.generation
            )
            refused = [w for w in again if policy.resend is not None and not policy.resend(w.frame)]
            for waiter in refused:
                self._lose(waiter, f"{self.name}: the connection ended ({cause}); this intercept is not sent again")
            again = [w for w in again if w not in refused]
            log.info("%s: session open again (attempt %d); %d intercept(s) sent again", self.name, attempt,
                     len(again))  # fmt: skip
            if again:
                with contextlib.suppress(TransportError):  # then the reader finds the end, and tries again
                    await self._submit(again)
            return True
        self._fail_all(
            InterceptLostError(
                f"{self.name}: the connection ended ({cause}) and {policy.attempts} attempts to open it again "
                f"failed; the last: {last}"
            )
        )
        return False

    def _lose(self, waiter: _Waiter, message: str) -> None:
        for key, each in list(self._waiting.items()):
            if each is waiter:
                del self._waiting[key]
        waiter.error = InterceptLostError(message, frame=waiter.frame)
        waiter.event.set()

    def _deliver(self, frame: bytes) -> None:
        if self.reply is None:
            self.reply = check_hello_reply(frame, self.hello, where=self.name)
            return
        kind = message_type(frame)
        try:
            if kind == COMPLETION:
                self._complete(decode_completion(frame))
            elif kind == ANNOUNCEMENT:
                ranges, final = decode_announcement(frame)
                self._announcing.extend(ranges)
                if final:
                    self.ports, self._announcing = self._announcing, []
                    self._announced.set()
            elif kind == LIFECYCLE_REPLY:
                reply = self._replies.reply(frame)
                if reply is not None:
                    waiter = self._lifecycle.pop(reply.request_id, None)
                    if waiter is None:
                        log.warning("lifecycle reply to request %d, which is not in flight", reply.request_id)
                    else:
                        waiter.reply = reply
                        waiter.event.set()
            else:
                raise TransportError(f"{self.name} sent a frame of type {kind:#x}, which clients do not read")
        except FrameError as error:
            what = {COMPLETION: "a completion", ANNOUNCEMENT: "an announcement"}.get(kind, "a lifecycle reply")
            raise TransportError(f"{self.name} sent {what} that cannot be read: {error}") from error

    def _complete(self, completion: Completion) -> None:
        waiter = self._waiting.pop((completion.source_partition, completion.vp_index), None)
        if waiter is None:
            log.warning(
                "completion for partition %d, VP %#x, which has nothing in flight",
                completion.source_partition,
                completion.vp_index,
            )
            return
        waiter.completion = completion
        waiter.event.set()

    def _fail_lifecycle(self, error: BaseException) -> None:
        waiting, self._lifecycle = self._lifecycle, {}
        for waiter in waiting.values():
            waiter.error = error
            waiter.event.set()

    def _fail_all(self, error: DispatchError) -> None:
        if self._error is None:
            self._error = error
        waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            waiter.error = error
            waiter.event.set()
        self._fail_lifecycle(error)
        self._announced.set()
        self._reconnected.set()

    async def __aenter__(self) -> ServiceClient:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._receive)
        failure: DispatchError | None = None
        try:
            with anyio.fail_after(self.announce_timeout):
                # The service may have answered (a refusal) and closed before the HELLO
                # went out: then the reader, which gets to what arrived, says what happened.
                with contextlib.suppress(TransportError):
                    await self.transport.send_batch([encode_hello(self.hello)])
                await self._announced.wait()
        except TimeoutError:
            failure = TransportError(
                f"{self.name} did not answer the HELLO within {self.announce_timeout:g} s"
                if self.reply is None
                else f"{self.name} sent no port announcement within {self.announce_timeout:g} s"
            )
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        if failure is None and self._error is not None:
            failure = self._error
            if self._ended:
                failure = TransportClosedError(
                    f"{self.name} closed the connection without answering the HELLO"
                    if self.reply is None
                    else f"{self.name} closed the connection before announcing its ports"
                )
        if failure is not None:
            await self.__aexit__(None, None, None)
            raise failure
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._task_group is not None
        self._closing = True
        with anyio.CancelScope(shield=True):
            await self.transport.aclose()  # ends _receive
        self._fail_all(TransportClosedError("the client is closed"))
        self._task_group.cancel_scope.cancel()  # a reconnection waiting between attempts
        return await self._task_group.__aexit__(exc_type, exc, tb)


@asynccontextmanager
async def connect_service(
    path: str | os.PathLike[str],
    *,
    vm: int = 0,
    server_uid: int | Iterable[int] | None = None,
    capabilities: Capability | None = None,
    announce_timeout: float = 5.0,
    reconnect: Reconnect | bool = False,
) -> AsyncIterator[ServiceClient]:
    """Connect to a service's UNIX socket as VM ``vm``; yields the client once the service has announced its ports.

    The process listening there must be run by this user, by root or by a
    user in ``server_uid`` (one uid or several), else
    :class:`~transports.socket_path.ServerIdentityError` is raised before
    anything is sent. Refusals and version mismatches raise as
    :class:`ServiceClient` says. ``reconnect`` (True for the defaults, or a
    :class:`Reconnect`) opens the session again at the same path, with the
    same checks, when the connection ends.
    """
    where = f"the service at {os.fspath(path)}"
    trusted = allowed_server_uids(server_uid)

    async def connect() -> Transport:
        transport = await connect_unix(path, name=where)
        try:
            check_server(transport.socket, trusted, path=path)
        except BaseException:
            await transport.aclose()
            raise
        return transport

    policy = None
    if reconnect:
        policy = replace(Reconnect() if reconnect is True else reconnect, connect=connect)
    transport = await connect()
    async with ServiceClient(
        transport, vm=vm, capabilities=capabilities, announce_timeout=announce_timeout, name=where, reconnect=policy
    ) as client:
        yield client


@asynccontextmanager
async def spawn_service(
    argv: Sequence[str], *, vm: int = 0, capabilities: Capability | None = None, announce_timeout: float = 30.0
) -> AsyncIterator[ServiceClient]:
    """Run a service as a child process speaking on its stdin and stdout (``serve --stdio``), as VM ``vm``.

    ``announce_timeout`` includes the child's start-up. Leaving closes the
    pipes, which makes the service exit; it is killed if it has not within
    five seconds.
    """
    to_child, child_stdin = os.pipe()
    child_stdout, from_child = os.pipe()
    try:
        process = await anyio.open_process(list(argv), stdin=to_child, stdout=from_child, stderr=None)
    except BaseException:
        os.close(child_stdin)
        os.close(child_stdout)
        raise
    finally:
        os.close(to_child)
        os.close(from_child)
    where = f"the service {argv[0]} (pid {process.pid})"
    transport = PipeTransport(child_stdout, child_stdin, name=where)
    try:
        async with ServiceClient(
            transport, vm=vm, capabilities=capabilities, announce_timeout=announce_timeout, name=where
        ) as client:
            yield client
    finally:
        with anyio.CancelScope(shield=True):
            await transport.aclose()
            with anyio.move_on_after(5):
                await process.wait()
            if process.returncode is None:
                log.warning("the service (pid %d) did not exit when its pipes closed; killing it", process.pid)
                process.kill()
                await process.wait()
            await process.aclose()
