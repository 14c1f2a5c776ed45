"""Counts and latency per device and per VM, device inspection, and the documents a control request gets.

The in-process service runs here, each VM's dispatcher driven by fake VPs of
that VM's partition (a VM is a partition id, with devices of its own).
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator

import anyio
import pytest

from dispatcher import BufferMemory, BulkAccess, PortAccess, Router, Status, TransportClosedError, on_bulk, on_port
from transports.service import Service
from transports.service.control import ControlRequest, Request
from transports.service.control import Status as ControlStatus
from transports.service.introspect import device_of, register_like
from transports.service.metrics import LATENCY_BOUNDS, SAMPLE_EVERY, Histogram, instrument
from transports.testing import CompletionError, FakePartition
from transports.unix import UnixTransport

pytestmark = pytest.mark.anyio


class Latch:
    """A device object with register-like attributes, a property that must not run, and two claims."""

    io_base = 0x510

    def __init__(self) -> None:
        self.value = 0x1234
        self.enabled = True
        self.fifo = bytearray(b"\x01\x02")
        self.name = "latch"  # not an int, bool or bytes: not shown
        self._private = 7
        self.property_reads = 0

    @property
    def status(self) -> int:
        self.property_reads += 1
        return 0xFF

    @on_port(0, 2)
    def io(self, access: PortAccess) -> int | None:
        if access.is_write:
            self.value = access.value
            return None
        return self.value >> 8 * access.offset

    @on_port(4, access="r")
    def broken(self, access: PortAccess) -> int:
        raise RuntimeError("broken on purpose")


class Slotted:
    __slots__ = ("empty", "level")
    io_base = 0x600

    def __init__(self) -> None:
        self.level = 3

    @on_port(0)
    def port(self, access: PortAccess) -> int:
        return self.level


def build() -> tuple[Router, Latch]:
    router = Router()
    latch = Latch()
    router.include(latch)
    router.include(Slotted())

    @router.claim(0x700)
    async def waits(access: PortAccess) -> int:
        await anyio.sleep(0)
        return 0x42

    return router, latch


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    yield Service(lambda: build()[0], deadline=None)


def vm(service: Service, number: int) -> FakePartition:
    """Fake VPs of VM ``number``, wired to that VM's own dispatcher."""
    devices = service.vm(number)
    return FakePartition(devices.router, partition_id=number, dispatcher=devices.dispatcher)


async def test_calls_and_failures_are_counted_per_device_and_per_vm(service: Service) -> None:
    async with vm(service, 1) as vm1, vm(service, 2) as vm2:
        await vm1.vp(0).outw(0x510, 0xBEEF)
        assert await vm1.vp(1).inb(0x511) == 0xBE
        assert await vm2.vp(0).inb(0x700) == 0x42
        with pytest.raises(CompletionError):
            await vm2.vp(0).inb(0x514)
        await vm2.vp(0).inb(0x5FF)  # unclaimed: counted in the totals only
    document = await service.stats_document()
    assert document["intercepts"]["received"] == 5 and document["intercepts"]["handler_failed"] == 1
    devices = {d["name"]: d for d in document["devices"]}
    assert (devices["Latch.io"]["calls"], devices["Latch.io"]["ports"]) == (2, "0x510-0x511 rw")
    assert (devices["Latch.broken"]["calls"], devices["Latch.broken"]["failures"]) == (1, 1)
    assert devices["build.waits"]["calls"] == 1 and devices["Slotted.port"]["calls"] == 0
    vms = {vm["id"]: vm for vm in document["vms"]}
    assert set(vms) == {1, 2}
    assert [(d["name"], d["calls"]) for d in vms[1]["devices"]] == [("Latch.io", 2)]
    assert (vms[2]["calls"], vms[2]["failures"]) == (2, 1)
    json.dumps(document)  # a JSON document as it is


async def test_handler_latency_is_sampled_and_async_handlers_are_always_timed(service: Service) -> None:
    calls = 2 * SAMPLE_EVERY + 1
    async with vm(service, 1) as vm1:
        for _ in range(calls):
            await vm1.vp(0).inb(0x510)
        for _ in range(3):
            await vm1.vp(0).inb(0x700)
    devices = {d["name"]: d for d in (await service.stats_document(1))["vms"][0]["devices"]}
    timed = devices["Latch.io"]["latency"]
    # Calls 1, 65 and 129 of this VM were timed.
    assert devices["Latch.io"]["calls"] == calls and timed["samples"] == 3
    assert len(timed["counts"]) == len(LATENCY_BOUNDS) + 1 and timed["sum_seconds"] > 0
    assert devices["build.waits"]["latency"]["samples"] == 3


async def test_a_vm_never_seen_is_refused(service: Service) -> None:
    async with vm(service, 1) as vm1:
        await vm1.vp(0).inb(0x600)
    reply = await service.answer(ControlRequest(Request.STATS, 5, 9))
    assert reply.status is ControlStatus.NO_SUCH_VM
    assert reply.document == b"VM 9 is not served (no VMM has connected for it); VMs served: 1"
    assert (await service.answer(ControlRequest(Request.INSPECT, 5, 9))).status is ControlStatus.NO_SUCH_VM
    assert (await service.answer(ControlRequest(99, 5, None))).status is ControlStatus.UNKNOWN_REQUEST
    ok = await service.answer(ControlRequest(Request.STATS, 5, 1))
    assert ok.status is ControlStatus.OK and [vm["id"] for vm in json.loads(ok.document)["vms"]] == [1]


async def test_inspect_groups_claims_by_device_and_reads_attributes_without_running_code() -> None:
    latches: list[Latch] = []

    def make() -> Router:
        router, latch = build()
        latches.append(latch)
        return router

    service = Service(make, deadline=None)
    async with vm(service, 4) as vm4:
        await vm4.vp(0).outw(0x510, 0xCAFE)
    [latch] = latches  # made for VM 4, on its first use
    property_reads = latch.property_reads  # Router.include looks at every attribute, properties too
    document = await service.inspect_document(4)
    assert document["vm"] == 4 and {d["vm"] for d in document["devices"]} == {4}
    devices = {d["name"]: d for d in document["devices"]}
    assert [d["name"] for d in document["devices"]] == ["Latch", "Slotted", "build.waits"]  # by first port
    latch_doc = devices["Latch"]
    assert latch_doc["type"] == f"{__name__}.Latch" and latch_doc["calls"] == 1
    assert [(h["name"], h["ports"], h["calls"]) for h in latch_doc["handlers"]] == [
        ("Latch.io", "0x510-0x511 rw", 1),
        ("Latch.broken", "0x514 r", 0),
    ]
    assert latch_doc["registers"] == {"enabled": True, "fifo": "0102", "io_base": 0x510,
                                      "property_reads": property_reads, "value": 0xCAFE}  # fmt: skip
    assert latch.property_reads == property_reads  # inspecting did not read the property
    assert devices["Slotted"]["registers"] == {"io_base": 0x600, "level": 3}  # a slot, and the class attribute
    assert devices["build.waits"]["type"] == "function" and devices["build.waits"]["registers"] == {}


def test_register_like_values() -> None:
    latch = Latch()
    latch.fifo = bytearray(300)
    assert register_like(latch)["fifo"] == bytes(300)
    assert device_of(latch.io) is latch and device_of(print) is None and device_of(build) is None


def test_bulk_claims_and_claim_settings_survive_instrumenting() -> None:
    class Disk:
        io_base = 0x170

        @on_port(0, 8, max_size=2)
        def registers(self, access: PortAccess) -> int:
            return 0

        @on_bulk(0)
        def data(self, access: BulkAccess) -> bytes:
            return bytes(access.elements * access.size)

    router = Router()
    router.include(Disk())
    copy, metrics = instrument(router)
    assert [(c.first, c.last, c.access, c.max_size, c.is_async, c.name) for c in copy.claims] == [
        (c.first, c.last, c.access, c.max_size, c.is_async, c.name) for c in router.claims
    ]
    assert [(b.first, b.access, b.name) for b in copy.bulk_claims] == [
        (b.first, b.access, b.name) for b in router.bulk_claims
    ]
    assert [m.ports for m in metrics] == ["0x170-0x177 rw", "0x170 rw bulk"]


async def test_a_bulk_handler_counts_one_call_per_chunk() -> None:
    class Fifo:
        io_base = 0x1F0

        @on_port(0)
        def element(self, access: PortAccess) -> int:
            return 0

        @on_bulk(0)
        def chunk(self, access: BulkAccess) -> bytes:
            return bytes(access.elements * access.size)

    router = Router()
    router.include(Fifo())
    copy, metrics = instrument(router)
    memory = BufferMemory([(0, bytearray(0x1000))])
    async with FakePartition(copy, partition_id=3, memory=memory) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx = 0x100, 64
        assert (await vp.insw(0x1F0, rep=True)).status is Status.COMPLETED
    bulk = next(m for m in metrics if m.bulk)
    assert bulk.calls == {3: 1} and bulk.latency[3].samples == 1


def test_histogram_buckets_and_percentiles() -> None:
    histogram = Histogram()
    assert histogram.percentile(50) is None
    for seconds in (0.5e-6, 2e-6, 2e-6, 3e-6, 20.0):
        histogram.add(seconds)
    assert histogram.counts[0] == 1 and histogram.counts[1] == 2 and histogram.counts[-1] == 1
    assert histogram.percentile(50) == 2.5e-6 and histogram.percentile(100) == float("inf")


async def test_the_peer_gone_before_the_announcement_is_logged_once_by_name(caplog: pytest.LogCaptureFixture) -> None:
    devices = Service(lambda: build()[0], deadline=None).vm(3)
    ours, theirs = socket.socketpair()
    theirs.close()
    transport = UnixTransport(ours, name="connection 9 (pid 1, uid 2)")
    with caplog.at_level(logging.DEBUG, logger="intercept_dispatch.service"):
        await devices.serve(transport)
    lines = [r.getMessage() for r in caplog.records if r.name == "intercept_dispatch.service"]
    gone = [line for line in lines if "peer has gone" in line]
    assert gone and all(line.count("connection 9") == 1 for line in lines), lines
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "intercept_dispatch.service")


def test_the_transport_names_itself_in_its_errors() -> None:
    # What the check above relies on: a transport's error already carries the connection's name.
    error = TransportClosedError("connection 9 (pid 1, uid 2): the peer has gone (write: Broken pipe)")
    assert str(error).startswith("connection 9")
