"""The anyio dispatcher: per-VP order, concurrency, failures, deadlines and graceful stop."""

from __future__ import annotations

import functools
import os
import socket
import threading

import anyio
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
from transports.memory import memory_transport_pair
from transports.pipe import PipeTransport
from transports.testing import CompletionError, CpuMode, FakePartition, FakeVP
from transports.unix import UnixTransport

pytestmark = pytest.mark.anyio


def frame(port: int, *, vp: int, write: bool = False, rax: int = 0) -> bytes:
    return IoPortInterceptMessage(
        port_number=port, access_type=AccessType(int(write)), access_info=AccessInfo.build(1), rax=rax, vp_index=vp
    ).to_bytes()


@pytest.fixture
def router() -> Router:
    router = Router()
    scratch = {"value": 0}

    @router.claim(0x3FF)
    def scratch_register(access: PortAccess) -> int | None:
        if access.is_write:
            scratch["value"] = access.value
            return None
        return scratch["value"]

    return router


async def test_fixture_vp_reads_back_what_it_wrote(fake_vp: FakeVP) -> None:
    await fake_vp.outb(0x3FF, 0x5A)
    assert await fake_vp.inb(0x3FF) == 0x5A


@pytest.mark.parametrize(
    ("mode", "port", "size", "length"),
    [
        (CpuMode.REAL, 0x3FF, 1, 1),  # in al, dx
        (CpuMode.REAL, 0x80, 2, 2),  # in ax, imm8
        (CpuMode.REAL, 0x80, 4, 3),  # 66 in eax, imm8
        (CpuMode.PROTECTED, 0x80, 2, 3),  # 66 in ax, imm8
        (CpuMode.LONG, 0x3FF, 4, 1),  # in eax, dx
    ],
)
async def test_fake_vp_advances_rip_by_its_instruction_length(
    router: Router, mode: CpuMode, port: int, size: int, length: int
) -> None:
    async with FakePartition(router, mode=mode) as partition:
        vp = partition.vp(0)
        start = vp.rip
        await vp.access(port, size, write=False)
        assert vp.rip == start + length


async def test_fake_vp_applies_the_architectural_rax_merge(router: Router) -> None:
    async with FakePartition(router) as partition:
        vp = partition.vp(0)
        await vp.outl(0x3FF, 0x99)
        vp.rax = 0xFFFF_FFFF_FFFF_FFFF
        assert await vp.inb(0x3FF) == 0x99
        assert vp.rax == 0xFFFF_FFFF_FFFF_FF99
        assert await vp.inw(0x3FE) == 0x99FF  # 0x3FE unclaimed: its byte reads all ones
        assert vp.rax == 0xFFFF_FFFF_FFFF_99FF
        assert await vp.inl(0x3FF) == 0xFFFF_FF99
        assert vp.rax == 0x0000_0000_FFFF_FF99


async def test_strict_vp_raises_on_a_failed_handler_after_applying_the_completion() -> None:
    router = Router()

    @router.claim(0x64)
    def broken(access: PortAccess) -> int:
        raise ValueError("no")

    async with FakePartition(router) as partition:
        vp = partition.vp(0)
        with pytest.raises(CompletionError, match="HANDLER_FAILED"):
            await vp.inb(0x64)
        assert vp.rax & 0xFF == 0xFF
    async with FakePartition(router, strict=False) as partition:
        assert await partition.vp(1).inb(0x64) == 0xFF


async def test_one_vp_waits_its_turn_while_others_run() -> None:
    router = Router()
    order: list[str] = []
    release = anyio.Event()

    @router.claim(0x10)
    async def slow(access: PortAccess) -> int:
        order.append(f"slow start vp{access.vp_index}")
        await release.wait()
        order.append(f"slow end vp{access.vp_index}")
        return 1

    @router.claim(0x11)
    def fast(access: PortAccess) -> int:
        order.append(f"fast vp{access.vp_index}")
        return 2

    client, server = memory_transport_pair()
    dispatcher = Dispatcher(router)
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.serve, server)
        await client.send_batch([frame(0x10, vp=0), frame(0x11, vp=0), frame(0x11, vp=1)])
        first = [decode_completion(f) for f in await client.receive_batch()]
        assert [c.vp_index for c in first] == [1]  # VP 1 is not held up by VP 0
        assert order == ["fast vp1", "slow start vp0"] or order == ["slow start vp0", "fast vp1"]
        release.set()
        rest: list[Completion] = []
        while len(rest) < 2:
            rest += [decode_completion(f) for f in await client.receive_batch()]
        assert [(c.vp_index, c.rax & 0xFF) for c in rest] == [(0, 1), (0, 2)]
        assert order.index("fast vp0") > order.index("slow end vp0")
        dispatcher.stop()


async def test_an_async_handler_past_its_deadline_is_cancelled_and_completed() -> None:
    router = Router()

    @router.claim(0x20)
    async def hangs(access: PortAccess) -> int:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    @router.claim(0x21)
    async def fine(access: PortAccess) -> int:
        return 0x42

    async with FakePartition(router, strict=False, deadline=0.05) as partition:
        results: dict[int, int] = {}

        async def hang() -> None:
            results[0] = await partition.vp(0).inb(0x20)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hang)
            results[1] = await partition.vp(1).inb(0x21)
        assert results == {0: 0xFF, 1: 0x42}
        hung = partition.vp(0).last_completion
        assert hung is not None and hung.status is Status.DEADLINE_EXCEEDED
        assert partition.dispatcher.stats.deadline_exceeded == 1


async def test_an_async_handler_failure_is_one_completion() -> None:
    router = Router()

    @router.claim(0x30)
    async def broken(access: PortAccess) -> None:
        raise KeyError("gone")

    async with FakePartition(router, strict=False) as partition:
        vp = partition.vp(3)
        await vp.outb(0x30, 1)
        assert vp.last_completion is not None and vp.last_completion.status is Status.HANDLER_FAILED
        await vp.outb(0x30, 1)  # the VP keeps running
        assert partition.dispatcher.stats.handler_failed == 2


async def test_graceful_stop_finishes_in_flight_intercepts() -> None:
    router = Router()
    started = anyio.Event()

    @router.claim(0x40)
    async def slow(access: PortAccess) -> int:
        started.set()
        await anyio.sleep(0.05)
        return 0x77

    client, server = memory_transport_pair()
    dispatcher = Dispatcher(router)
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.serve, server)
        await client.send_batch([frame(0x40, vp=0), frame(0x40, vp=0), frame(0x40, vp=1)])
        await started.wait()
        dispatcher.stop()
        received: list[Completion] = []
        while frames := await client.receive_batch():
            received += [decode_completion(f) for f in frames]
    assert sorted(c.vp_index for c in received) == [0, 0, 1]
    assert all(c.status is Status.COMPLETED and c.rax & 0xFF == 0x77 for c in received)


async def test_many_vps_concurrently() -> None:
    router = Router()
    counts: dict[int, int] = {}

    @router.claim(0x50, 4)
    async def per_vp(access: PortAccess) -> int | None:
        await anyio.sleep(0)
        if access.is_write:
            counts[access.vp_index] = access.value
            return None
        return counts.get(access.vp_index, 0)

    async def guest(vp: FakeVP) -> None:
        for i in range(20):
            await vp.outl(0x50, vp.index * 1000 + i)
            assert await vp.inl(0x50) == vp.index * 1000 + i

    async with FakePartition(router) as partition, anyio.create_task_group() as tg:
        for index in range(64):
            tg.start_soon(guest, partition.vp(index))
    assert partition.dispatcher.stats.completed == 64 * 40


async def test_a_peer_that_goes_away_ends_serve_without_an_error() -> None:
    client, server = memory_transport_pair()
    await client.send_batch([frame(0x3FF, vp=0)])
    await client.aclose()
    await Dispatcher(Router()).serve(server)  # returns: the completion has nowhere to go


async def test_runtime_install_and_remove_takes_effect_on_the_next_intercept(router: Router) -> None:
    async with FakePartition(router) as partition:
        vp = partition.vp(0)
        assert await vp.inb(0x3F0) == 0xFF
        claim = router.add(lambda access: 0x12, 0x3F0)
        assert await vp.inb(0x3F0) == 0x12
        router.remove(claim)
        assert await vp.inb(0x3F0) == 0xFF


@pytest.mark.parametrize("argument", ["max_queued", "max_jobs", "max_elements"])
def test_bounds_below_one_are_refused_naming_the_argument(argument: str) -> None:
    with pytest.raises(ValueError, match=f"{argument} must be at least 1, not 0"):
        Dispatcher(Router(), **{argument: 0})  # type: ignore[arg-type]


async def test_serve_for_one_partition_refuses_the_others_on_the_loop_path(router: Router) -> None:
    client, server = memory_transport_pair()
    dispatcher = Dispatcher(router)
    mine = IoPortInterceptMessage(port_number=0x3FF, access_info=AccessInfo.build(1), source_partition=5).to_bytes()
    other = IoPortInterceptMessage(port_number=0x3FF, access_info=AccessInfo.build(1), source_partition=6).to_bytes()
    async with anyio.create_task_group() as tg:
        await tg.start(functools.partial(dispatcher.serve, server, partition=5))
        await client.send_batch([mine, other])
        got: list[Completion] = []
        while len(got) < 2:
            got += [decode_completion(f) for f in await client.receive_batch()]
        dispatcher.stop()
    assert [(c.source_partition, c.status) for c in got] == [(5, Status.COMPLETED), (6, Status.PROTOCOL_ERROR)]


@pytest.mark.parametrize("kind", ["unix", "pipe"])
async def test_byte_stream_transports_answer_synchronous_handlers_on_their_own_thread(kind: str) -> None:
    router = Router()
    threads: list[int] = []

    @router.claim(0x3FF)
    def where(access: PortAccess) -> int:
        threads.append(threading.get_ident())
        return 0x33

    if kind == "unix":
        a, b = socket.socketpair()
        server: Transport = UnixTransport(a)
        client: Transport = UnixTransport(b)
    else:
        to_server, to_client = os.pipe(), os.pipe()
        server = PipeTransport(to_server[0], to_client[1])
        client = PipeTransport(to_client[0], to_server[1])
    dispatcher = Dispatcher(router)
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.serve, server)
        await client.send_batch([frame(0x3FF, vp=0), frame(0x3FF, vp=1)])
        got: list[Completion] = []
        while len(got) < 2:
            got += [decode_completion(f) for f in await client.receive_batch()]
        dispatcher.stop()
        assert await client.receive_batch() == []  # the service side ended after stop()
    await client.aclose()
    assert [c.rax & 0xFF for c in got] == [0x33, 0x33]
    assert len(threads) == 2 and threading.get_ident() not in threads
