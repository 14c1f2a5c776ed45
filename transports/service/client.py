"""The VMM's side of a device service connection: what a VMM embeds, and what the tests drive.

::

    async with connect_service("/run/user/1000/intercept-dispatch.sock") as client:
        print(client.ports)                       # the announced port set
        completion = await client.exchange(frame) # one intercept, one completion

Many VPs may each have an intercept in flight over one connection; a
completion is matched to its VP by (partition, VP index), which is all the
protocol needs because a VP waits for its completion before it runs on.
Frames from VPs that become ready together go out in one write.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Sequence
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
    IoPortInterceptMessage,
    PortRange,
    Transport,
    TransportClosedError,
    TransportError,
    decode_announcement,
    decode_completion,
)
from dispatcher.wire import frame_ids, message_type

from ..pipe import PipeTransport
from ..unix import connect_unix

__all__ = ["ServiceClient", "connect_service", "io_intercept", "spawn_service"]

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

    Use it as an async context manager: entering waits (up to
    ``announce_timeout`` seconds) for the service's port announcement and
    raises :class:`~dispatcher.TransportError` if none comes; leaving closes
    the transport.
    """

    def __init__(self, transport: Transport, *, announce_timeout: float = 5.0) -> None:
        self.transport = transport
        self.announce_timeout = announce_timeout
        self.ports: list[PortRange] = []
        """The port ranges the service claims, as announced."""
        self._announcing: list[PortRange] = []
        self._announced = anyio.Event()
        self._waiting: dict[tuple[int, int], _Waiter] = {}
        self._outbox: list[bytes] = []
        self._flushing = False
        self._error: DispatchError | None = None
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
            error = TransportClosedError("the service closed the connection")
        except DispatchError as failure:
            error = failure
        self._fail_all(error)

    def _deliver(self, frame: bytes) -> None:
        kind = message_type(frame)
        if kind == COMPLETION:
            completion = decode_completion(frame)
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
        elif kind == ANNOUNCEMENT:
            ranges, final = decode_announcement(frame)
            self._announcing.extend(ranges)
            if final:
                self.ports, self._announcing = self._announcing, []
                self._announced.set()
        else:
            raise TransportError(f"the service sent a frame of type {kind:#x}, which clients do not read")

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
                await self._announced.wait()
        except TimeoutError:
            failure = TransportError(f"no port announcement from the service within {self.announce_timeout} s")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        if failure is None and self._error is not None:
            failure = TransportClosedError(f"no port announcement from the service: {self._error}")
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
    path: str | os.PathLike[str], *, announce_timeout: float = 5.0
) -> AsyncIterator[ServiceClient]:
    """Connect to a service's UNIX socket; yields the client once the service has announced its ports."""
    transport = await connect_unix(path)
    async with ServiceClient(transport, announce_timeout=announce_timeout) as client:
        yield client


@asynccontextmanager
async def spawn_service(argv: Sequence[str], *, announce_timeout: float = 30.0) -> AsyncIterator[ServiceClient]:
    """Run a service as a child process speaking on its stdin and stdout (``serve --stdio``).

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
    transport = PipeTransport(child_stdout, child_stdin, name=f"pipes to {argv[0]} (pid {process.pid})")
    try:
        async with ServiceClient(transport, announce_timeout=announce_timeout) as client:
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
