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
import logging
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from types import TracebackType

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
from dispatcher.wire import HELLO_REPLY, frame_ids, message_type

from ..pipe import PipeTransport
from ..socket_path import allowed_server_uids, check_server
from ..unix import UnixTransport, connect_unix

__all__ = ["ServiceClient", "check_hello_reply", "connect_service", "io_intercept", "open_session", "spawn_service"]

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
    return Capability.GUEST_MEMORY if isinstance(transport, UnixTransport) else Capability.NONE


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
    __slots__ = ("completion", "error", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.completion: Completion | None = None
        self.error: BaseException | None = None

    def result(self) -> Completion:
        if self.error is not None:
            raise self.error
        assert self.completion is not None
        return self.completion


class ServiceClient:
    """Intercepts out, completions back, over any :class:`~dispatcher.Transport` to a service.

    Use it as an async context manager: entering sends the HELLO for VM
    ``vm`` with ``capabilities`` (by default GUEST_MEMORY over a UNIX
    socket, which can carry memory descriptors, none otherwise), then waits
    (up to ``announce_timeout`` seconds in all) for the service's HELLO_REPLY
    and port announcement; leaving closes the transport. Entering raises
    :class:`~dispatcher.SessionRefusedError` or
    :class:`~dispatcher.IncompatibleVersionError` as
    :func:`check_hello_reply` says, and :class:`~dispatcher.TransportError`
    if the service does not answer. ``name`` begins every error message
    (default: the transport's name).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        vm: int = 0,
        capabilities: Capability | None = None,
        announce_timeout: float = 5.0,
        name: str | None = None,
    ) -> None:
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
        self._task_group: anyio.abc.TaskGroup | None = None

    @property
    def in_flight(self) -> int:
        """Intercepts sent and not yet completed."""
        return len(self._waiting)

    async def exchange(self, frame: bytes) -> Completion:
        """Send one intercept frame and return the completion for its VP.

        Raises ``RuntimeError`` if that VP already has an intercept in flight
        (a real VP cannot), :class:`~dispatcher.TransportClosedError` if the
        connection ends first. If the call is cancelled after sending, the
        VP stays busy until its completion arrives and is discarded.
        """
        if self._error is not None:
            raise self._error
        key = frame_ids(frame)  # where the service finds the VP, even of a frame it rejects
        if key in self._waiting:
            raise RuntimeError(f"partition {key[0]}, VP {key[1]:#x} already has an intercept in flight")
        # Once registered, the frame is sent even if this call is cancelled,
        # and the waiter stays registered until its completion arrives.
        waiter = self._waiting[key] = _Waiter()
        await self._submit((frame,))
        await waiter.event.wait()
        return waiter.result()

    async def exchange_many(self, frames: Sequence[bytes]) -> list[Completion]:
        """Send intercepts for several VPs in one write; return their completions in the same order."""
        if self._error is not None:
            raise self._error
        keys = [frame_ids(frame) for frame in frames]
        if len(set(keys)) != len(keys) or any(key in self._waiting for key in keys):
            raise RuntimeError(f"a VP among partition/VP {keys} already has an intercept in flight")
        waiters = [_Waiter() for _ in frames]
        self._waiting.update(zip(keys, waiters, strict=True))
        await self._submit(frames)
        for waiter in waiters:
            await waiter.event.wait()
        return [waiter.result() for waiter in waiters]

    async def _submit(self, frames: Sequence[bytes]) -> None:
        self._outbox.extend(frames)
        if self._flushing:
            return  # the task already flushing sends these with its own
        self._flushing = True
        try:
            # A write, once begun, must finish for every frame in it.
            with anyio.CancelScope(shield=True):
                if len(self._waiting) > len(frames):
                    # Other VPs are in flight and may become ready in this same
                    # turn of the loop: let them add their frames to this write.
                    await anyio.lowlevel.cancel_shielded_checkpoint()
                while self._outbox:
                    batch, self._outbox = self._outbox, []
                    await self.transport.send_batch(batch)
        except TransportError as error:
            self._fail_all(error)
            raise
        finally:
            self._flushing = False

    async def _receive(self) -> None:
        error: DispatchError
        try:
            while frames := await self.transport.receive_batch():
                for frame in frames:
                    self._deliver(frame)
            self._ended = True
            error = TransportClosedError(f"{self.name} closed the connection")
        except TransportClosedError as failure:
            # A reset (the service closed with our HELLO unread) is an end of stream too.
            self._ended = True
            error = failure
        except DispatchError as failure:
            error = failure
        self._fail_all(error)

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
            else:
                raise TransportError(f"{self.name} sent a frame of type {kind:#x}, which clients do not read")
        except FrameError as error:
            what = "a completion" if kind == COMPLETION else "an announcement"
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

    def _fail_all(self, error: DispatchError) -> None:
        if self._error is None:
            self._error = error
        waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            waiter.error = error
            waiter.event.set()
        self._announced.set()

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
        with anyio.CancelScope(shield=True):
            await self.transport.aclose()  # ends _receive
        self._fail_all(TransportClosedError("the client is closed"))
        return await self._task_group.__aexit__(exc_type, exc, tb)


@asynccontextmanager
async def connect_service(
    path: str | os.PathLike[str],
    *,
    vm: int = 0,
    server_uid: int | Iterable[int] | None = None,
    capabilities: Capability | None = None,
    announce_timeout: float = 5.0,
) -> AsyncIterator[ServiceClient]:
    """Connect to a service's UNIX socket as VM ``vm``; yields the client once the service has announced its ports.

    The process listening there must be run by this user, by root or by a
    user in ``server_uid`` (one uid or several), else
    :class:`~transports.socket_path.ServerIdentityError` is raised before
    anything is sent. Refusals and version mismatches raise as
    :class:`ServiceClient` says.
    """
    where = f"the service at {os.fspath(path)}"
    transport = await connect_unix(path, name=where)
    try:
        check_server(transport.socket, allowed_server_uids(server_uid), path=path)
    except BaseException:
        await transport.aclose()
        raise
    async with ServiceClient(
        transport, vm=vm, capabilities=capabilities, announce_timeout=announce_timeout, name=where
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
