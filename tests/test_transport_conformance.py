"""Every frame-pair transport passes the conformance suite, on both anyio backends; broken ones fail it.

The KVM transport is not a frame pair (its frames come from vCPU exits); its guest tests cover it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from dispatcher import Transport, TransportClosedError
from transports.conformance import (
    CHECKS,
    Connect,
    check_batching,
    check_one_completion_each,
    check_peer_closes_with_intercept_in_flight,
    check_per_vp_order,
    check_send_to_gone_peer,
    check_stop_when_idle,
    check_transport,
)
from transports.memory import MemoryTransport, memory_transport_pair
from transports.pipe import PipeTransport
from transports.shared_memory import SharedMemoryTransport
from transports.unix import UnixTransport

pytestmark = pytest.mark.anyio

Pair = tuple[Transport, Transport]


@asynccontextmanager
async def closing(service: Transport, vmm: Transport) -> AsyncIterator[Pair]:
    try:
        yield service, vmm
    finally:
        await service.aclose()
        await vmm.aclose()


def memory_pair() -> Pair:
    return memory_transport_pair()


def pipe_pair() -> Pair:
    to_service, to_vmm = os.pipe(), os.pipe()
    service = PipeTransport(to_service[0], to_vmm[1], name="service pipes")
    vmm = PipeTransport(to_vmm[0], to_service[1], name="vmm pipes")
    return service, vmm


def unix_pair() -> Pair:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return UnixTransport(a, name="service"), UnixTransport(b, name="vmm")


def shared_memory_pair() -> Pair:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return SharedMemoryTransport(UnixTransport(a, name="service")), UnixTransport(b, name="vmm")


PAIRS: dict[str, Callable[[], Pair]] = {
    "memory": memory_pair,
    "pipe": pipe_pair,
    "unix": unix_pair,
    "shared_memory": shared_memory_pair,
}


def connector(name: str) -> Connect:
    make = PAIRS[name]

    def connect() -> AbstractAsyncContextManager[Pair]:
        return closing(*make())

    return connect


@pytest.mark.parametrize("transport", list(PAIRS))
@pytest.mark.parametrize("check", CHECKS, ids=[check.__name__ for check in CHECKS])
async def test_conformance(transport: str, check: Callable[[Connect], Awaitable[None]]) -> None:
    await check(connector(transport))


@pytest.mark.parametrize("transport", list(PAIRS))
async def test_check_transport_runs_every_check(transport: str) -> None:
    await check_transport(connector(transport))


# --- the suite catches broken transports -----------------------------------------------------------


class Reordering(MemoryTransport):
    """Delivers each batch backwards."""

    async def receive_batch(self) -> list[bytes]:
        return (await super().receive_batch())[::-1]


class OneAtATime(MemoryTransport):
    """Returns one frame per receive_batch, keeping the rest for later calls."""

    def __init__(
        self, send: MemoryObjectSendStream[list[bytes]], receive: MemoryObjectReceiveStream[list[bytes]]
    ) -> None:
        super().__init__(send, receive)
        self.held: list[bytes] = []

    async def receive_batch(self) -> list[bytes]:
        if not self.held:
            self.held = await super().receive_batch()
        first, self.held = self.held[:1], self.held[1:]
        return first


class Duplicating(MemoryTransport):
    """Delivers the first frame of every batch twice."""

    async def receive_batch(self) -> list[bytes]:
        frames = await super().receive_batch()
        return frames[:1] + frames


class WrongError(MemoryTransport):
    """Reports a gone peer as BrokenPipeError instead of TransportClosedError."""

    async def send_batch(self, frames: Sequence[bytes]) -> None:
        try:
            await super().send_batch(frames)
        except TransportClosedError as error:
            raise BrokenPipeError("gone") from error


LEAKED: list[int] = []


class Leaking(MemoryTransport):
    """Opens a descriptor it never closes."""

    def __init__(
        self, send: MemoryObjectSendStream[list[bytes]], receive: MemoryObjectReceiveStream[list[bytes]]
    ) -> None:
        super().__init__(send, receive)
        LEAKED.append(os.open(os.devnull, os.O_RDONLY))


def broken_connector(kind: type[MemoryTransport]) -> Connect:
    @asynccontextmanager
    async def connect() -> AsyncIterator[Pair]:
        a_send, b_receive = anyio.create_memory_object_stream[list[bytes]](64)
        b_send, a_receive = anyio.create_memory_object_stream[list[bytes]](64)
        async with closing(kind(a_send, a_receive), kind(b_send, b_receive)) as pair:
            yield pair

    return connect


BROKEN = [
    (Reordering, check_per_vp_order, "one VP's frames must be delivered in the order they were sent"),
    (OneAtATime, check_batching, "came out of receive_batch one at a time"),
    (Duplicating, check_one_completion_each, "two completions for one intercept"),
    (WrongError, check_send_to_gone_peer, "send_batch raised BrokenPipeError"),
    (WrongError, check_peer_closes_with_intercept_in_flight, "serve\\(\\) raised"),
    (Leaking, check_stop_when_idle, "file descriptors still open after the pair was closed: .*/dev/null"),
]


@pytest.mark.parametrize(
    ("kind", "check", "complaint"),
    [pytest.param(*case, id=f"{case[0].__name__}-{case[1].__name__}") for case in BROKEN],
)
async def test_the_suite_catches_a_broken_transport(
    kind: type[MemoryTransport], check: Callable[[Connect], Awaitable[None]], complaint: str
) -> None:
    try:
        with pytest.raises(AssertionError, match=complaint):
            await check(broken_connector(kind))
    finally:
        while LEAKED:
            os.close(LEAKED.pop())


async def test_one_frame_per_receive_passes_when_declared() -> None:
    await check_batching(broken_connector(OneAtATime), batches=False)
