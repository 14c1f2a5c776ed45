"""Guest memory shared as memfds over a UNIX socket pair, served in process; what the service refuses."""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import pytest
from string_driver import Vp, instruction

from dispatcher import (
    UNKNOWN_VP,
    Completion,
    Dispatcher,
    FieldValueError,
    MemoryFault,
    PortAccess,
    Registers,
    Router,
    Status,
    UnsupportedReason,
    decode_completion,
)
from transports.pipe import PipeTransport
from transports.shared_memory import (
    MAX_BYTES,
    REGION,
    RegionBudget,
    RegionLimitError,
    SharedMemoryTransport,
    UnsealedRegionError,
    decode_region,
    encode_region,
    encode_unmap,
    memfd_for_sharing,
    seal_against_shrinking,
    share_region,
    unshare_region,
    with_shared_memory,
)
from transports.unix import UnixTransport

pytestmark = pytest.mark.anyio

PORT = 0x1F0
PAGE = mmap.ALLOCATIONGRANULARITY


def test_region_frames_byte_by_byte() -> None:
    frame = encode_region(0x1_0000, 0x2_0000, fd_offset=PAGE, read_only=True)
    assert len(frame) == 48
    assert frame[:16] == struct.pack("<IBBHQ", REGION, 32, 0, 0, 0)
    assert frame[16:24] == bytes([1, 0x01, 0, 0, 0, 0, 0, 0])
    assert struct.unpack_from("<QQQ", frame, 24) == (0x1_0000, 0x2_0000, PAGE)
    assert decode_region(frame) == (0x1_0000, 0x2_0000, PAGE, True, False)
    unmap = encode_unmap(0x1_0000)
    assert unmap[17] == 0x02 and decode_region(unmap).unmap


@pytest.mark.parametrize(
    ("frame", "offset"),
    [
        (encode_region(0, 0), 32),  # empty
        (encode_region(0xFFFF_FFFF_FFFF_F000, 0x2000), 32),  # past 2**64
        (encode_region(0, 0x1000, fd_offset=1), 40),
        (bytes(encode_region(0, 0x1000)[:16]) + b"\x02" + encode_region(0, 0x1000)[17:], 16),  # version 2
        (bytes(encode_region(0, 0x1000)[:17]) + b"\x80" + encode_region(0, 0x1000)[18:], 17),  # unknown flag
    ],
)
def test_bad_region_frames_name_the_field(frame: bytes, offset: int) -> None:
    with pytest.raises(FieldValueError) as caught:
        decode_region(frame)
    assert caught.value.offset == offset


@contextmanager
def memfd(size: int) -> Iterator[tuple[int, mmap.mmap]]:
    """A memfd and the VMM's own mapping of it."""
    fd = memfd_for_sharing("guest-ram", size)
    try:
        with mmap.mmap(fd, size) as mapping:
            yield fd, mapping
    finally:
        os.close(fd)


class Port:
    def __init__(self) -> None:
        self.sent: list[int] = []
        self.next = 0x100

    def handle(self, access: PortAccess) -> int | None:
        if access.is_write:
            self.sent.append(access.value)
            return None
        self.next += 1
        return self.next


@asynccontextmanager
async def served(router: Router, budget: RegionBudget | None = None) -> AsyncIterator[UnixTransport]:
    """A Dispatcher serving one end of a socket pair wrapped for shared memory; yields the VMM's end."""
    vmm_socket, service_socket = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    vmm = UnixTransport(vmm_socket, name="vmm")
    dispatcher = Dispatcher(router, deadline=None)
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.serve, with_shared_memory(UnixTransport(service_socket, name="service"), budget))
        try:
            yield vmm
        finally:
            await vmm.aclose()


async def exchange(vmm: UnixTransport, frame: bytes) -> Completion:
    await vmm.send_batch([frame])
    (reply,) = await vmm.receive_batch()
    return decode_completion(reply)


def string_frame(*, outs: bool, rcx: int, index: int, size: int = 2) -> bytes:
    code = instruction("protected", outs=outs, size=size, rep=True, address_size=32, segment=None)
    vp = Vp("protected", rcx=rcx, rsi=index, rdi=index)
    return vp.message(PORT, code, outs=outs, size=size, rep=True).to_bytes()


async def test_string_io_reads_and_writes_the_vmm_memory() -> None:
    port = Port()
    router = Router()
    router.add(port.handle, PORT, 2)
    with memfd(0x4000) as (fd, ram):
        ram[0x3000:0x3004] = b"\x11\x22\x33\x44"
        async with served(router) as vmm:
            await share_region(vmm, 0x10_0000, fd, 0x4000)
            completion = await exchange(vmm, string_frame(outs=False, rcx=3, index=0x10_0010))
            assert completion.status is Status.COMPLETED and completion.rdi == 0x10_0016
            assert ram[0x10:0x16] == bytes([0x01, 0x01, 0x02, 0x01, 0x03, 0x01])  # 0x101, 0x102, 0x103
            completion = await exchange(vmm, string_frame(outs=True, rcx=2, index=0x10_3000))
            assert completion.status is Status.COMPLETED and port.sent == [0x2211, 0x4433]


async def test_regions_at_offsets_read_only_and_unmapped() -> None:
    router = Router()
    router.add(Port().handle, PORT, 2)
    with memfd(2 * PAGE) as (fd, ram):
        async with served(router) as vmm:
            # The second page of the memfd at 0x2000_0000, read-only for the guest.
            await share_region(vmm, 0x2000_0000, fd, PAGE, fd_offset=PAGE, read_only=True)
            ram[PAGE : PAGE + 2] = b"\xab\xcd"
            completion = await exchange(vmm, string_frame(outs=True, rcx=1, index=0x2000_0000))
            assert completion.status is Status.COMPLETED
            completion = await exchange(vmm, string_frame(outs=False, rcx=1, index=0x2000_0000))
            assert completion.status is Status.MEMORY_ERROR and completion.detail == MemoryFault.READ_ONLY
            await unshare_region(vmm, 0x2000_0000)
            completion = await exchange(vmm, string_frame(outs=True, rcx=1, index=0x2000_0000))
            assert completion.status is Status.MEMORY_ERROR and completion.detail == MemoryFault.UNMAPPED
            assert completion.registers == Registers.NONE


async def test_a_bad_region_gets_an_error_reply_and_the_connection_goes_on() -> None:
    router = Router()
    router.add(Port().handle, PORT, 2)
    with memfd(PAGE) as (fd, _):
        async with served(router) as vmm:
            for frame, status, detail in (
                (encode_region(0, 2 * PAGE), Status.MEMORY_ERROR, errno.EINVAL),  # larger than the memfd
                (encode_region(0, PAGE, fd_offset=3), Status.PROTOCOL_ERROR, 40),
            ):
                await vmm.send_fds(frame, [fd])
                (reply,) = await vmm.receive_batch()
                error = decode_completion(reply)
                assert (error.vp_index, error.status, error.detail) == (UNKNOWN_VP, status, detail)
            await share_region(vmm, 0, fd, PAGE)
            await vmm.send_fds(encode_region(PAGE // 2, PAGE), [fd])  # overlaps the first
            (reply,) = await vmm.receive_batch()
            assert decode_completion(reply).detail == errno.EEXIST
            await unshare_region(vmm, 0x5000_0000)  # nothing there
            (reply,) = await vmm.receive_batch()
            assert decode_completion(reply).detail == errno.ENOENT
            completion = await exchange(vmm, string_frame(outs=False, rcx=2, index=0x10))
            assert completion.status is Status.COMPLETED


async def test_a_region_frame_applies_after_the_frames_sent_before_it() -> None:
    # The intercept before the unmap still sees the region; the one after does not.
    router = Router()
    router.add(Port().handle, PORT, 2)
    with memfd(PAGE) as (fd, _):
        async with served(router) as vmm:
            await share_region(vmm, 0, fd, PAGE)
            first = string_frame(outs=True, rcx=1, index=0x10)
            second = bytearray(first)
            second[16:20] = (1).to_bytes(4, "little")  # VP 1
            await vmm.send_batch([first, encode_unmap(0), bytes(second)])
            replies: list[Completion] = []
            while len(replies) < 2:
                replies += [decode_completion(frame) for frame in await vmm.receive_batch()]
            by_vp = {c.vp_index: c.status for c in replies}
            assert by_vp == {0: Status.COMPLETED, 1: Status.MEMORY_ERROR}


async def test_closing_the_connection_unmaps_the_regions() -> None:
    vmm_socket, service_socket = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    service = SharedMemoryTransport(UnixTransport(service_socket))
    vmm = UnixTransport(vmm_socket)
    with memfd(PAGE) as (fd, _):
        await share_region(vmm, 0, fd, PAGE)
        await vmm.send_batch([string_frame(outs=True, rcx=1, index=0)])
        frames = await service.receive_batch()
        assert len(frames) == 1 and service.guest_memory.regions()[0].size == PAGE
        await service.aclose()
        await vmm.aclose()
    assert service.guest_memory.regions() == ()


async def test_the_pipe_transport_has_no_guest_memory() -> None:
    router = Router()
    router.add(Port().handle, PORT, 2)
    to_service, service_in = os.pipe()
    service_out, from_service = os.pipe()
    service = PipeTransport(to_service, from_service)
    assert with_shared_memory(service) is service
    vmm = PipeTransport(service_out, service_in)
    async with anyio.create_task_group() as tg:
        await tg.start(Dispatcher(router).serve, service)
        await vmm.send_batch([string_frame(outs=False, rcx=1, index=0)])
        (reply,) = await vmm.receive_batch()
        await vmm.aclose()
    completion = decode_completion(reply)
    assert completion.status is Status.UNSUPPORTED and completion.detail == UnsupportedReason.NO_GUEST_MEMORY


async def test_a_region_frame_without_its_descriptor_closes_the_connection() -> None:
    router = Router()
    router.add(Port().handle, PORT, 2)
    async with served(router) as vmm:
        await vmm.send_batch([encode_region(0, PAGE)])  # no SCM_RIGHTS: the descriptor queue is out of step
        assert await vmm.receive_batch() == []


async def test_a_graceful_stop_answers_what_had_arrived() -> None:
    router = Router()
    router.add(Port().handle, PORT, 2)
    vmm_socket, service_socket = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    vmm = UnixTransport(vmm_socket)
    dispatcher = Dispatcher(router, deadline=None)
    with memfd(PAGE) as (fd, _):
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.serve, with_shared_memory(UnixTransport(service_socket)))
            await share_region(vmm, 0, fd, PAGE)
            await vmm.send_batch([string_frame(outs=False, rcx=2, index=0x10)])
            await anyio.wait_all_tasks_blocked()
            dispatcher.stop()
            replies = await vmm.receive_batch()
            assert [decode_completion(frame).status for frame in replies] == [Status.COMPLETED]
            assert await vmm.receive_batch() == []  # then the service closes the connection
        await vmm.aclose()


# What the service refuses, so that guest memory cannot hurt it.


def port_router() -> Router:
    router = Router()
    router.add(Port().handle, PORT, 2)
    return router


async def refusal(vmm: UnixTransport, frame: bytes, fd: int) -> Completion:
    """Send a region frame with ``fd`` as it is (no sealing on the way) and return the error reply."""
    await vmm.send_fds(frame, [fd])
    (reply,) = await vmm.receive_batch()
    return decode_completion(reply)


@pytest.mark.parametrize("sealable", [True, False])
async def test_a_memfd_without_the_shrink_seal_is_refused(sealable: bool, caplog: pytest.LogCaptureFixture) -> None:
    # A VMM that could shrink the file under the mapping would kill the service with SIGBUS at the next access.
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
    os.ftruncate(fd, PAGE)
    try:
        async with served(port_router()) as vmm:
            with caplog.at_level(logging.WARNING, "intercept_dispatch.transports"):
                error = await refusal(vmm, encode_region(0, PAGE), fd)
            assert (error.vp_index, error.status, error.detail) == (UNKNOWN_VP, Status.MEMORY_ERROR, errno.EBADFD)
            assert "not sealed with F_SEAL_SHRINK" in caplog.text
            completion = await exchange(vmm, string_frame(outs=True, rcx=1, index=0))
            assert completion.status is Status.MEMORY_ERROR  # nothing was mapped
    finally:
        os.close(fd)


async def test_a_plain_file_is_refused_as_it_cannot_be_sealed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ram"
    path.write_bytes(bytes(PAGE))
    fd = os.open(path, os.O_RDWR)
    try:
        async with served(port_router()) as vmm:
            with caplog.at_level(logging.WARNING, "intercept_dispatch.transports"):
                error = await refusal(vmm, encode_region(0, PAGE), fd)
            assert (error.status, error.detail) == (Status.MEMORY_ERROR, errno.EBADFD)
            assert "cannot be sealed (F_GET_SEALS" in caplog.text
        with pytest.raises(UnsealedRegionError, match=r"cannot be sealed .* F_SEAL_SHRINK"):
            seal_against_shrinking(fd)
    finally:
        os.close(fd)


async def test_share_region_seals_a_sealable_memfd_and_names_the_seal_otherwise() -> None:
    sealable = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    fixed = os.memfd_create("guest-ram", os.MFD_CLOEXEC)  # sealing not allowed: F_SEAL_SEAL from the start
    try:
        for fd in (sealable, fixed):
            os.ftruncate(fd, PAGE)
        async with served(port_router()) as vmm:
            await share_region(vmm, 0, sealable, PAGE)
            assert fcntl.fcntl(sealable, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
            assert (await exchange(vmm, string_frame(outs=True, rcx=1, index=0))).status is Status.COMPLETED
            with pytest.raises(UnsealedRegionError, match=r"cannot take F_SEAL_SHRINK .*MFD_ALLOW_SEALING"):
                await share_region(vmm, PAGE, fixed, PAGE)
    finally:
        os.close(sealable)
        os.close(fixed)


async def test_a_shared_memfd_cannot_shrink_under_the_service() -> None:
    # The hostile sequence: share, shrink, then string I/O over the region. The shrink fails; the access works.
    with memfd(2 * PAGE) as (fd, ram):
        async with served(port_router()) as vmm:
            await share_region(vmm, 0, fd, 2 * PAGE)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, PAGE)
            assert os.fstat(fd).st_size == 2 * PAGE
            ram[PAGE + 0x10 : PAGE + 0x12] = b"\x34\x12"
            completion = await exchange(vmm, string_frame(outs=True, rcx=1, index=PAGE + 0x10))
            assert completion.status is Status.COMPLETED


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_mapped_regions_keep_no_descriptor_open() -> None:
    with memfd(PAGE) as (fd, _):
        async with served(port_router()) as vmm:
            await share_region(vmm, 0, fd, PAGE)
            await exchange(vmm, string_frame(outs=True, rcx=1, index=0))  # the region is in place
            before = open_descriptors()
            for n in range(1, 41):
                await share_region(vmm, n * PAGE, fd, PAGE, read_only=n % 2 == 0)
            completion = await exchange(vmm, string_frame(outs=True, rcx=1, index=40 * PAGE))
            assert completion.status is Status.COMPLETED  # the 41st region is mapped
            assert open_descriptors() == before


async def test_a_region_larger_than_the_budget_is_refused_before_anything_is_mapped() -> None:
    # 128 TiB of a sparse memfd, as a hostile client sends: over the default 64 GiB a VM may map.
    fd = memfd_for_sharing("guest-ram", 128 << 40)
    try:
        async with served(port_router()) as vmm:
            error = await refusal(vmm, encode_region(0, 128 << 40), fd)
            assert (error.status, error.detail) == (Status.MEMORY_ERROR, errno.EDQUOT)
            error = await refusal(vmm, encode_region(0, MAX_BYTES + PAGE), fd)
            assert error.detail == errno.EDQUOT
            await share_region(vmm, 0, fd, MAX_BYTES)  # exactly the budget: mapped
            assert (await exchange(vmm, string_frame(outs=True, rcx=1, index=0))).status is Status.COMPLETED
    finally:
        os.close(fd)


async def test_the_budget_is_per_vm_across_its_connections(caplog: pytest.LogCaptureFixture) -> None:
    budget = RegionBudget(max_regions=3, max_bytes=4 * PAGE)

    async def settle(vmm: UnixTransport) -> None:
        # Each connection is read on its own: an intercept answered means its region frames before it are applied.
        # REP with RCX 0 touches no memory, so it completes whatever is mapped.
        assert (await exchange(vmm, string_frame(outs=True, rcx=0, index=0))).status is Status.COMPLETED

    with memfd(4 * PAGE) as (fd, _):
        async with served(port_router(), budget) as first, served(port_router(), budget) as second:
            await share_region(first, 0, fd, PAGE)
            await share_region(first, PAGE, fd, PAGE)
            await share_region(second, 0, fd, PAGE)
            await settle(first)
            await settle(second)
            assert (budget.regions, budget.bytes) == (3, 3 * PAGE)
            with caplog.at_level(logging.WARNING, "intercept_dispatch.transports"):
                error = await refusal(second, encode_region(PAGE, PAGE), fd)
                assert (error.status, error.detail) == (Status.MEMORY_ERROR, errno.ENOSPC)
                assert "the VM has 3 regions mapped, its limit is 3" in caplog.text
                await unshare_region(first, PAGE)
                await settle(first)
                await share_region(second, PAGE, fd, 2 * PAGE)  # room for a region again, and for its bytes
                await settle(second)
                assert (budget.regions, budget.bytes) == (3, 4 * PAGE)
                await unshare_region(first, 0)
                await settle(first)
                error = await refusal(second, encode_region(4 * PAGE, 2 * PAGE), fd)
                assert error.detail == errno.EDQUOT  # a region free, but no bytes
                assert f"over the VM's limit of {4 * PAGE} mapped bytes" in caplog.text
        # Closing the connections gave everything back.
        assert (budget.regions, budget.bytes) == (0, 0)


def test_a_budget_names_the_limit_it_refuses() -> None:
    budget = RegionBudget(max_regions=1, max_bytes=10)
    with pytest.raises(RegionLimitError, match="a region of 11 bytes is over the VM's limit of 10") as caught:
        budget.reserve(11)
    assert (caught.value.limit, caught.value.errno) == ("bytes", errno.EDQUOT)
    budget.reserve(10)
    with pytest.raises(RegionLimitError, match="1 regions mapped, its limit is 1") as caught:
        budget.reserve(1)
    assert (caught.value.limit, caught.value.errno) == ("regions", errno.ENOSPC)
    budget.release(10)
    assert (budget.regions, budget.bytes) == (0, 0)
    with pytest.raises(ValueError, match="cannot be negative"):
        RegionBudget(max_regions=-1)


async def test_inline_answers_see_exactly_the_regions_sent_before_them() -> None:
    # The wrapper start_inline hands the UNIX transport: region frames are applied on the reader thread between
    # the runs of other frames, and their error replies take their place among the completions.
    vmm_socket, service_socket = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    unix = UnixTransport(service_socket, name="service")
    given: list[object] = []
    unix.start_inline = given.append  # type: ignore[method-assign,assignment]  # stands in for the reader thread
    service = SharedMemoryTransport(unix)
    assert SharedMemoryTransport.answers_inline is UnixTransport.answers_inline
    seen: list[tuple[int, ...]] = []

    def answer(frames: Sequence[bytes]) -> list[bytes]:
        seen.append(tuple(region.size for region in service.guest_memory.regions()))
        return [b"done %d" % len(frames)]

    service.start_inline(answer)
    [wrapped] = given
    assert callable(wrapped)
    vmm = UnixTransport(vmm_socket, name="vmm")
    intercept = string_frame(outs=True, rcx=1, index=0)
    with memfd(PAGE) as (fd, _):
        await vmm.send_batch([intercept])
        await share_region(vmm, 0, fd, PAGE)
        await vmm.send_batch([intercept, intercept, encode_unmap(0), encode_unmap(0), intercept])
        frames: list[bytes] = []
        while len(frames) < 7:
            frames += await unix.receive_batch()  # the frames, and the descriptor queued beside them
        out = wrapped(frames)
    assert seen == [(), (PAGE,), ()]
    assert out[:3] == [b"done 1", b"done 2", out[2]] and out[3:] == [b"done 1"]
    error = decode_completion(out[2])  # the second unmap: no region there
    assert (error.vp_index, error.status, error.detail) == (UNKNOWN_VP, Status.MEMORY_ERROR, errno.ENOENT)
    await vmm.aclose()
    await service.aclose()
