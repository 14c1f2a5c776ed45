"""The stream splitter and the UNIX-socket and pipe transports, in process."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from service_helpers import intercept

from dispatcher import (
    Dispatcher,
    FieldValueError,
    Router,
    Status,
    TransportClosedError,
    TransportError,
    decode_completion,
    encode_announcement,
)
from dispatcher.hello import Hello
from transports.framing import FrameSplitter
from transports.pipe import PipeTransport, open_fifos
from transports.service import ServiceClient
from transports.service.opening import accept, read_opening
from transports.unix import UnixListener, UnixTransport, connect_unix

# --- the splitter -------------------------------------------------------------------------------

FRAMES = [intercept(0x3F8 + i, vp=i) for i in range(3)] + [b"\x02\x00\x00\x1d" + bytes([8]) + bytes(19)]


@given(st.lists(st.integers(min_value=1, max_value=300), max_size=40))
def test_the_splitter_finds_the_same_frames_however_the_stream_is_cut(cuts: list[int]) -> None:
    stream = b"".join(FRAMES * 3)
    splitter = FrameSplitter()
    frames, at = [], 0
    for size in cuts:
        frames += splitter.feed(stream[at : at + size])
        at += size
    frames += splitter.feed(stream[at:])
    assert frames == FRAMES * 3
    assert (splitter.pending, splitter.offset, splitter.error) == (0, len(stream), None)


def test_the_splitter_reads_the_seed_header_layout_too() -> None:
    seed = bytearray(intercept(0x3F8))
    seed[4], seed[7] = 0, 128  # PayloadSize at byte 7, as the seed page draws it
    assert FrameSplitter().feed(bytes(seed) + FRAMES[1]) == [bytes(seed), FRAMES[1]]


def test_the_splitter_keeps_frames_of_unknown_types_and_short_payloads() -> None:
    # They can be delimited, so the engine, not the stream, rejects them.
    unknown_type = b"\x99\x00\x00\x00" + bytes([4]) + bytes(11) + b"four"
    header_alone = intercept(0x3F8)[:4] + bytes(12)  # PayloadSize 0
    assert FrameSplitter().feed(unknown_type + header_alone + FRAMES[0]) == [unknown_type, header_alone, FRAMES[0]]


def test_the_splitter_stops_at_an_undelimitable_header_after_the_frames_before_it() -> None:
    bad = bytearray(intercept(0x3F8))
    bad[4] = 241
    splitter = FrameSplitter()
    assert splitter.feed(FRAMES[0] + bytes(bad) + FRAMES[1]) == [FRAMES[0]]
    assert isinstance(splitter.error, FieldValueError)
    assert (splitter.error.field, splitter.error.offset, splitter.error.value) == ("payload_size", 4, 241)
    assert f"out of sync at byte {len(FRAMES[0])}" in str(splitter.error)
    assert splitter.feed(FRAMES[2]) == []


# --- the UNIX socket transport ------------------------------------------------------------------


def socket_pair() -> tuple[UnixTransport, UnixTransport]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return UnixTransport(a, name="a"), UnixTransport(b, name="b")


@pytest.mark.anyio
async def test_a_batch_goes_out_in_one_write_and_comes_back_whole() -> None:
    a, b = socket_pair()
    async with a, b:
        await a.send_batch(FRAMES)
        await a.send_batch([FRAMES[0][:50]])  # half a frame: not delivered yet
        assert await b.receive_batch() == FRAMES
        await a.send_batch([FRAMES[0][50:]])
        assert await b.receive_batch() == [FRAMES[0]]


@pytest.mark.anyio
async def test_end_of_stream_mid_frame_is_reported_as_closed(caplog: pytest.LogCaptureFixture) -> None:
    a, b = socket_pair()
    async with b:
        await a.send_batch([FRAMES[0], FRAMES[1][:30]])
        await a.aclose()
        assert await b.receive_batch() == [FRAMES[0]]
        assert await b.receive_batch() == []
        assert await b.receive_batch() == []
    assert "b: the peer closed in the middle of a frame; 30 bytes discarded" in caplog.text


@pytest.mark.anyio
async def test_an_out_of_sync_stream_raises_after_the_good_frames() -> None:
    a, b = socket_pair()
    async with a, b:
        await a.send_batch([FRAMES[0], b"\x00\x00\x01\x80" + bytes([250]) + bytes(11)])
        assert await b.receive_batch() == [FRAMES[0]]
        with pytest.raises(TransportError, match="out of sync"):
            await b.receive_batch()


@pytest.mark.anyio
async def test_writing_to_a_vanished_peer_raises_transport_closed() -> None:
    a, b = socket_pair()
    await b.aclose()
    async with a:
        with pytest.raises(TransportClosedError, match="the peer has gone"):
            for _ in range(100):
                await a.send_batch(FRAMES)
        with pytest.raises(TransportClosedError):
            await a.aclose()
            await a.send_batch(FRAMES)


@pytest.mark.anyio
async def test_a_large_batch_is_written_whole_while_the_reader_is_slow() -> None:
    a, b = socket_pair()
    batch = [intercept(0x3F8, vp=vp) for vp in range(4000)]  # 576 KB: more than the socket buffers hold
    received: list[bytes] = []
    async with a, b, anyio.create_task_group() as tg:
        tg.start_soon(a.send_batch, batch)
        while len(received) < len(batch):
            received += await b.receive_batch()
    assert received == batch


@pytest.mark.anyio
async def test_stop_reading_delivers_what_had_arrived_then_ends() -> None:
    a, b = socket_pair()
    async with a, b:
        received: list[bytes] = []

        async def reader() -> None:
            while frames := await b.receive_batch():
                received.extend(frames)

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await a.send_batch(FRAMES[:1])
            await anyio.wait_all_tasks_blocked()
            await a.send_batch(FRAMES[1:])  # arrives before the stop: still delivered
            b.stop_reading()
        assert received == FRAMES
        with pytest.raises(TransportClosedError):  # after the stop the socket refuses more
            await a.send_batch(FRAMES)
        assert await b.receive_batch() == []
        await b.send_batch(FRAMES[:1])  # writing still works
        assert await a.receive_batch() == FRAMES[:1]


@pytest.mark.anyio
async def test_descriptors_travel_beside_their_frame() -> None:
    a, b = socket_pair()
    memory = os.memfd_create("guest-ram")
    os.write(memory, b"guest memory")
    async with a, b:
        await a.send_batch(FRAMES[:1])
        await a.send_fds(FRAMES[1], [memory, memory])
        await a.send_batch(FRAMES[2:])
        frames: list[bytes] = []
        while len(frames) < len(FRAMES):
            frames += await b.receive_batch()
        assert frames == FRAMES
        assert b.queued_fds == 2
        received = b.take_fds(2)
        with pytest.raises(TransportError, match="1 descriptors wanted, 0 received"):
            b.take_fds(1)
    try:
        assert os.pread(received[0], 12, 0) == b"guest memory"
        assert os.fstat(received[1]).st_ino == os.fstat(memory).st_ino
    finally:
        for fd in (memory, *received):
            os.close(fd)
    with pytest.raises(ValueError, match="descriptors"):
        await a.send_fds(FRAMES[0], [])


@pytest.mark.anyio
async def test_descriptors_nobody_takes_are_closed_with_the_transport() -> None:
    a, b = socket_pair()
    async with a:
        await a.send_fds(FRAMES[0], [0])
        await b.receive_batch()
        assert b.queued_fds == 1
        open_before = len(os.listdir("/proc/self/fd"))
        await b.aclose()
        assert len(os.listdir("/proc/self/fd")) == open_before - 2  # the socket and the descriptor


def test_the_peer_is_identified() -> None:
    a, b = socket_pair()
    try:
        assert a.peer_credentials() == (os.getpid(), os.getuid(), os.getgid())
    finally:
        a.socket.close()
        b.socket.close()


# --- the listener -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_listener_binds_private_accepts_and_removes_its_file(tmp_path: Path) -> None:
    path = tmp_path / "l.sock"
    listener = UnixListener.bind(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with await connect_unix(path) as client:
        server = await listener.accept()
        async with server:
            await client.send_batch(FRAMES)
            assert await server.receive_batch() == FRAMES
    await listener.aclose()
    assert not path.exists()
    with pytest.raises(anyio.ClosedResourceError):
        await listener.accept()


@pytest.mark.anyio
async def test_the_listener_does_not_remove_a_file_that_replaced_its_own(tmp_path: Path) -> None:
    path = tmp_path / "l.sock"
    listener = UnixListener.bind(path)
    path.unlink()
    successor = UnixListener.bind(path)
    await listener.aclose()
    assert path.exists()
    await successor.aclose()
    assert not path.exists()


def test_a_live_socket_is_not_replaced_and_a_dead_one_is(tmp_path: Path) -> None:
    path = tmp_path / "l.sock"
    live = UnixListener.bind(path)
    try:
        with pytest.raises(OSError) as in_use:
            UnixListener.bind(path)
        assert in_use.value.errno == errno.EADDRINUSE
    finally:
        live.socket.close()  # closed without removing its file: a dead service's leftover
    assert path.exists()
    replacement = UnixListener.bind(path, mode=0o640)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    replacement.socket.close()


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "l.sock"
    path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        UnixListener.bind(path)
    assert path.read_text() == "precious"


def test_connecting_where_nothing_listens_fails_plainly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        anyio.run(connect_unix, tmp_path / "none.sock")


# --- pipes --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_pipes_carry_batches_and_restore_blocking_mode() -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    watch_r, watch_w = os.dup(r1), os.dup(w2)  # the same open files, to see their flags
    try:
        left, right = PipeTransport(r1, w2), PipeTransport(r2, w1)
        assert not os.get_blocking(watch_r)
        async with left, right:
            await right.send_batch(FRAMES)
            assert await left.receive_batch() == FRAMES
            await left.send_batch(FRAMES[::-1])
            assert await right.receive_batch() == FRAMES[::-1]
        assert os.get_blocking(watch_r) and os.get_blocking(watch_w)
    finally:
        os.close(watch_r)
        os.close(watch_w)


@pytest.mark.anyio
async def test_fifos_open_in_either_order(tmp_path: Path) -> None:
    up, down = str(tmp_path / "up"), str(tmp_path / "down")
    os.mkfifo(up)
    os.mkfifo(down)
    ends: dict[str, PipeTransport] = {}

    async def open_side(name: str, read: str, write: str) -> None:
        ends[name] = await open_fifos(read, write)

    async with anyio.create_task_group() as tg:
        tg.start_soon(open_side, "service", up, down)
        tg.start_soon(open_side, "vmm", down, up)
    async with ends["service"], ends["vmm"]:
        await ends["vmm"].send_batch(FRAMES)
        assert await ends["service"].receive_batch() == FRAMES


# --- the client against a dispatcher in process -------------------------------------------------


@pytest.mark.anyio
async def test_the_client_and_a_dispatcher_over_a_socket_pair() -> None:
    router = Router()
    router.add(lambda access: 0x5A, 0x3F8, access="r")
    dispatcher = Dispatcher(router)
    a, b = socket_pair()

    async def service_side() -> None:
        # What the service does with a connection: its HELLO, the reply and announcement, then intercepts.
        hello = await read_opening(a, 60)
        assert isinstance(hello, Hello) and hello.vm == 0
        await accept(a, hello.vm, then=encode_announcement(router.port_ranges()))
        await dispatcher.serve(a, partition=hello.vm)

    async with anyio.create_task_group() as tg:
        tg.start_soon(service_side)
        async with ServiceClient(b) as client:
            assert [(r.first, r.last, r.access) for r in client.ports] == [(0x3F8, 0x3F8, 1)]
            completions = await client.exchange_many([intercept(0x3F8, vp=vp) for vp in range(32)])
            assert {(c.status, c.rax) for c in completions} == {(Status.COMPLETED, 0x5A)}
            assert client.in_flight == 0
        dispatcher.stop()
    assert decode_completion(completions[0].to_bytes()) == completions[0]
