"""Synchronous handlers answered on the transport's own thread: the VM lock, bounds, partitions, hung handlers."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import pytest

from dispatcher import (
    AccessInfo,
    AccessType,
    Completion,
    Dispatcher,
    IoPortInterceptMessage,
    PortAccess,
    Router,
    Status,
    Transport,
    decode_completion,
)
from dispatcher.wire import Offset
from transports.memory import memory_transport_pair
from transports.unix import UnixTransport

pytestmark = pytest.mark.anyio

SYNC, ASYNC, SLOW, HUNG, LOCK_PROBE = 0x3F8, 0x3F9, 0x3FA, 0x3FB, 0x3FC


def intercept(port: int, *, vp: int = 0, seq: int = 0, write: bool = False, partition: int = 0) -> bytes:
    # Real mode, a one-byte instruction: the completion's RIP is seq + 1.
    return IoPortInterceptMessage(
        port_number=port,
        access_type=AccessType(int(write)),
        access_info=AccessInfo.build(1),
        vp_index=vp,
        source_partition=partition,
        rip=seq,
    ).to_bytes()


def other_thread_can_take(lock: threading.RLock) -> bool:
    """Whether a thread other than this one could take ``lock`` now."""
    taken: list[bool] = []

    def attempt() -> None:
        got = lock.acquire(blocking=False)
        if got:
            lock.release()
        taken.append(got)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    return taken[0]


def take_and_release(lock: threading.RLock) -> bool:
    """Take ``lock`` within 10 s (then release it): whether it could be taken."""
    if not lock.acquire(timeout=10):
        return False
    lock.release()
    return True


@asynccontextmanager
async def unix_served(
    dispatcher: Dispatcher, *, partition: int | None = None
) -> AsyncIterator[tuple[UnixTransport, anyio.Event]]:
    """Serve one end of a socketpair; yield the VMM's end and an event set when serve() returns."""
    a, b = socket.socketpair()
    service, vmm = UnixTransport(a, name="service"), UnixTransport(b, name="vmm")
    returned = anyio.Event()

    async def serve(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await dispatcher.serve(service, partition=partition, task_status=task_status)
        finally:
            returned.set()

    async with anyio.create_task_group() as tg:
        await tg.start(serve)
        try:
            yield vmm, returned
        finally:
            dispatcher.stop()
            await vmm.aclose()


async def receive(vmm: Transport, count: int) -> list[Completion]:
    got: list[Completion] = []
    with anyio.fail_after(10):
        while len(got) < count:
            frames = await vmm.receive_batch()
            assert frames, f"end of stream after {len(got)} of {count} completions"
            got += [decode_completion(frame) for frame in frames]
    return got


async def wait_until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.001)


async def test_a_sync_handler_runs_on_the_transport_thread_holding_the_vm_lock() -> None:
    router = Router()
    dispatcher = Dispatcher(router, deadline=None)
    seen: list[tuple[int, bool]] = []

    @router.claim(SYNC)
    def probe(access: PortAccess) -> int:
        seen.append((threading.get_ident(), other_thread_can_take(dispatcher.lock)))
        return 0x5A

    async with unix_served(dispatcher) as (vmm, _):
        await vmm.send_batch([intercept(SYNC)])
        (completion,) = await receive(vmm, 1)
    assert completion.status is Status.COMPLETED and completion.rax & 0xFF == 0x5A
    ((thread, others_could_take),) = seen
    assert thread != threading.get_ident()  # not the event loop's thread
    assert not others_could_take  # the handler held the VM lock


async def test_an_async_handler_holds_the_lock_except_while_it_awaits() -> None:
    router = Router()
    dispatcher = Dispatcher(router, deadline=None)
    seen: dict[str, object] = {}

    @router.claim(ASYNC)
    async def probe(access: PortAccess) -> int:
        seen["thread"] = threading.get_ident()
        seen["held before"] = not other_thread_can_take(dispatcher.lock)
        # While this awaits, a worker thread must be able to take the lock
        # (it gives up after 10 s, so a lock held across the await shows).
        seen["free while awaiting"] = await anyio.to_thread.run_sync(take_and_release, dispatcher.lock)
        seen["held after"] = not other_thread_can_take(dispatcher.lock)
        return 0x42

    async with unix_served(dispatcher) as (vmm, _):
        await vmm.send_batch([intercept(ASYNC), intercept(SYNC, seq=1)])
        completions = await receive(vmm, 2)
    assert [c.status for c in completions] == [Status.COMPLETED, Status.COMPLETED]  # an unclaimed port completes too
    assert completions[0].rax & 0xFF == 0x42
    assert seen == {
        "thread": threading.get_ident(),  # async handlers run on the event loop
        "held before": True,
        "free while awaiting": True,
        "held after": True,
    }


async def test_per_vp_order_holds_between_the_thread_and_the_loop() -> None:
    # Async and sync accesses of one VP interleaved: the loop's and the
    # thread's completions must still leave in the VP's order.
    router = Router()
    router.add(lambda access: 1, SYNC)

    async def slowly(access: PortAccess) -> int:
        await anyio.lowlevel.checkpoint()
        return 2

    router.add(slowly, ASYNC)
    dispatcher = Dispatcher(router, deadline=None)
    frames = [intercept(ASYNC if seq % 3 == 0 else SYNC, vp=seq % 2, seq=seq) for seq in range(300)]
    async with unix_served(dispatcher) as (vmm, _):
        for start in range(0, len(frames), 7):
            await vmm.send_batch(frames[start : start + 7])
        completions = await receive(vmm, len(frames))
    for vp in (0, 1):
        order = [c.rip - 1 for c in completions if c.vp_index == vp]
        assert order == sorted(order) and len(order) == 150


@pytest.mark.parametrize("kind", ["unix", "memory"])
async def test_a_connection_past_max_queued_is_not_read_until_it_drains(kind: str) -> None:
    router = Router()
    release = anyio.Event()
    entered = anyio.Event()
    answered_after_release: list[bool] = []

    @router.claim(SLOW)
    async def slow(access: PortAccess) -> int:
        entered.set()
        await release.wait()
        return 1

    @router.claim(SYNC)
    def other_vp(access: PortAccess) -> int:
        if access.vp_index == 1:
            answered_after_release.append(release.is_set())
        return 2

    dispatcher = Dispatcher(router, deadline=None, max_queued=3)
    async with anyio.create_task_group() as tg:
        if kind == "unix":
            a, b = socket.socketpair()
            service: Transport = UnixTransport(a, name="service")
            vmm: Transport = UnixTransport(b, name="vmm")
        else:
            service, vmm = memory_transport_pair()
        tg.start_soon(dispatcher.serve, service)
        await vmm.send_batch([intercept(SLOW, vp=0)])
        with anyio.fail_after(10):
            await entered.wait()
        await vmm.send_batch([intercept(SYNC, vp=0, seq=seq) for seq in range(1, 5)])
        await wait_until(lambda: dispatcher.queued == 4)
        # Past the bound: what the VMM sends now is not read, so VP 1 waits too.
        await vmm.send_batch([intercept(SYNC, vp=1, seq=9)])
        await anyio.sleep(0.2)
        assert answered_after_release == []
        release.set()
        completions = await receive(vmm, 6)
        assert dispatcher.queued == 0
        dispatcher.stop()
        await vmm.aclose()
    assert answered_after_release == [True]
    assert [(c.vp_index, c.rip - 1) for c in completions if c.vp_index == 0] == [(0, s) for s in range(5)]


async def test_a_connection_past_max_jobs_is_not_read_until_they_finish() -> None:
    router = Router()
    release = anyio.Event()
    answered_after_release: list[bool] = []

    @router.claim(SLOW)
    async def slow(access: PortAccess) -> int:
        await release.wait()
        return 1

    @router.claim(SYNC)
    def sync(access: PortAccess) -> int:
        answered_after_release.append(release.is_set())
        return 2

    dispatcher = Dispatcher(router, deadline=None, max_jobs=2)
    async with unix_served(dispatcher) as (vmm, _):
        await vmm.send_batch([intercept(SLOW, vp=0)])
        await vmm.send_batch([intercept(SLOW, vp=1)])
        await wait_until(lambda: dispatcher.jobs == 2)
        await vmm.send_batch([intercept(SYNC, vp=2)])
        await anyio.sleep(0.2)
        assert answered_after_release == []
        release.set()
        completions = await receive(vmm, 3)
    assert answered_after_release == [True]
    assert sorted(c.vp_index for c in completions) == [0, 1, 2]


async def test_frames_of_another_partition_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    router = Router()
    partitions: list[int] = []

    @router.claim(SYNC)
    def record(access: PortAccess) -> int:
        partitions.append(access.partition)
        return 0

    dispatcher = Dispatcher(router, deadline=None)
    with caplog.at_level(logging.WARNING, logger="intercept_dispatch.engine"):
        async with unix_served(dispatcher, partition=7) as (vmm, _):
            await vmm.send_batch([intercept(SYNC, partition=7), intercept(SYNC, partition=8, seq=1)])
            await vmm.send_batch([intercept(ASYNC, partition=9, seq=2)])  # the general path refuses it too
            completions = await receive(vmm, 3)
    assert partitions == [7]
    assert [(c.source_partition, c.status) for c in completions] == [
        (7, Status.COMPLETED),
        (8, Status.PROTOCOL_ERROR),
        (9, Status.PROTOCOL_ERROR),
    ]
    assert completions[1].detail == completions[2].detail == Offset.PARTITION
    assert "frame for partition 8 on VM 7's connection" in caplog.text
    assert dispatcher.stats.protocol_errors == 2


async def test_a_hung_handler_is_answered_at_the_deadline_and_ends_its_connection() -> None:
    hang = threading.Event()
    hung_reports: list[str] = []
    router = Router()

    @router.claim(HUNG)
    def hung(access: PortAccess) -> int:
        hang.wait(30)  # released at the end of the test
        return 0

    @router.claim(SYNC)
    def sync(access: PortAccess) -> int:
        return 3

    # Another VM (its own Dispatcher and lock) on another connection keeps going meanwhile.
    other = Dispatcher(router, deadline=None)
    dispatcher = Dispatcher(router, deadline=0.3, on_hung=hung_reports.append)
    try:
        async with unix_served(other) as (other_vmm, _), unix_served(dispatcher) as (vmm, returned):
            await vmm.send_batch([intercept(SYNC, vp=1), intercept(HUNG, vp=0, seq=1)])
            round_trips = 0
            with anyio.fail_after(10):
                while not returned.is_set():
                    await other_vmm.send_batch([intercept(SYNC, seq=round_trips)])
                    (answer,) = await receive(other_vmm, 1)
                    assert answer.status is Status.COMPLETED
                    round_trips += 1
                    await anyio.sleep(0.01)
            completions: list[Completion] = []
            with anyio.fail_after(10):
                while frames := await vmm.receive_batch():
                    completions += [decode_completion(frame) for frame in frames]
            # Counted by the watchdog (a handler that returns late is not counted again).
            assert dispatcher.stats.deadline_exceeded == 1
            hang.set()
    finally:
        hang.set()
    assert round_trips > 0
    # Exactly one completion each, the earlier frame's first; the late handler's result is dropped.
    assert [(c.vp_index, c.status) for c in completions] == [(1, Status.COMPLETED), (0, Status.DEADLINE_EXCEEDED)]
    assert completions[1].rax & 0xFF == 0xFF  # a dead device's read
    (report,) = hung_reports
    assert "deadline" in report and "partition 0, VP 0" in report
