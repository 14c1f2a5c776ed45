"""The opening exchange: HELLO and HELLO_REPLY byte by byte as docs/PROTOCOL.md draws them, every malformed
field named with its offset, and the service's reading of a connection's first frame over real sockets."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher import (
    Access,
    Completion,
    DispatchError,
    FieldValueError,
    FrameError,
    PortRange,
    ShortFrameError,
    TransportError,
    UnknownMessageTypeError,
    decode_completion,
    decode_message,
    encode_announcement,
)
from dispatcher.errors import IncompatibleVersionError, SessionRefusedError
from dispatcher.hello import (
    MAX_REASON,
    Capability,
    Hello,
    HelloReply,
    HelloStatus,
    decode_hello,
    decode_hello_reply,
    encode_hello,
    encode_hello_reply,
    version_refusal,
)
from dispatcher.wire import HELLO, HELLO_REPLY, SESSION_MAJOR, SESSION_MINOR
from transports import socket_path
from transports.pipe import PipeTransport
from transports.service.client import ServiceClient, connect_service, io_intercept, open_session
from transports.service.control import Request, encode_request
from transports.service.opening import ControlRequestStart, OpeningError, accept, read_opening, refuse
from transports.socket_path import PeerCredentials, ServerIdentityError, allowed_server_uids, check_server
from transports.unix import UnixTransport

pytestmark = pytest.mark.anyio


# The codec.


def test_a_hello_byte_by_byte() -> None:
    frame = encode_hello(Hello(vm=0x1122_3344, major=1, minor=2, capabilities=Capability.GUEST_MEMORY))
    assert len(frame) == 24
    assert frame[:8] == struct.pack("<IBBH", 0x1D00_0006, 8, 0, 0)
    assert frame[8:16] == (0x1122_3344).to_bytes(8, "little")  # SourcePartition: the VM
    assert frame[16:24] == struct.pack("<HHI", 1, 2, 1)  # Major, Minor, Capabilities
    assert decode_hello(frame) == Hello(0x1122_3344, 1, 2, Capability.GUEST_MEMORY)


def test_a_hello_reply_byte_by_byte() -> None:
    reply = HelloReply(vm=7, major=1, minor=0, capabilities=Capability(0), status=HelloStatus.REFUSED, reason="full")
    frame = encode_hello_reply(reply)
    assert len(frame) == 28 + 4
    assert frame[:8] == struct.pack("<IBBH", 0x1D00_0007, 12 + 4, 0, 0)
    assert frame[8:16] == (7).to_bytes(8, "little")
    assert frame[16:24] == struct.pack("<HHI", 1, 0, 0)
    assert frame[24:28] == bytes([2, 0]) + (4).to_bytes(2, "little")  # Status REFUSED, reserved, ReasonLength
    assert frame[28:] == b"full"
    assert decode_hello_reply(frame) == reply


def test_an_accepted_reply_has_no_reason_and_the_current_version() -> None:
    frame = encode_hello_reply(HelloReply(vm=0, capabilities=Capability.GUEST_MEMORY))
    assert len(frame) == 28
    decoded = decode_hello_reply(frame)
    assert decoded.accepted and decoded.reason == ""
    assert (decoded.major, decoded.minor, decoded.capabilities) == (SESSION_MAJOR, SESSION_MINOR, 1)


@given(
    vm=st.integers(0, (1 << 64) - 1),
    major=st.integers(0, 0xFFFF),
    minor=st.integers(0, 0xFFFF),
    capabilities=st.integers(0, 0xFFFF_FFFF),
)
def test_hello_round_trip(vm: int, major: int, minor: int, capabilities: int) -> None:
    hello = Hello(vm, major, minor, Capability(capabilities))
    assert decode_hello(encode_hello(hello)) == hello
    assert int(decode_hello(encode_hello(hello)).capabilities) == capabilities  # unknown bits kept


@given(
    vm=st.integers(0, (1 << 64) - 1),
    capabilities=st.integers(0, 0xFFFF_FFFF),
    status=st.sampled_from(HelloStatus),
    reason=st.text(max_size=60),
)
def test_hello_reply_round_trip(vm: int, capabilities: int, status: HelloStatus, reason: str) -> None:
    reply = HelloReply(vm, 3, 9, Capability(capabilities), status, reason)
    assert decode_hello_reply(encode_hello_reply(reply)) == reply


def test_a_long_reason_is_cut_at_a_character_within_one_frame() -> None:
    frame = encode_hello_reply(HelloReply(vm=1, status=HelloStatus.REFUSED, reason="é" * 200))
    assert len(frame) <= 256
    reason = decode_hello_reply(frame).reason
    assert reason == "é" * (MAX_REASON // 2) and MAX_REASON == 228


def test_a_longer_hello_payload_is_read_and_its_tail_ignored() -> None:
    # A later minor version may append fields.
    frame = bytearray(encode_hello(Hello(vm=5)))
    frame[4] = 8 + 16
    assert decode_hello(bytes(frame) + bytes(16)) == Hello(vm=5)


def test_the_seed_header_spelling_is_read() -> None:
    frame = bytearray(encode_hello(Hello(vm=9)))
    frame[4], frame[7] = 0, 8
    assert decode_hello(bytes(frame)) == Hello(vm=9)


def hello_reply_frame(*, status: int = 0, length: int = 0, payload: int | None = None, reason: bytes = b"") -> bytes:
    size = 12 + len(reason) if payload is None else payload
    head = struct.pack("<IBBHQHHIBxH", HELLO_REPLY, size, 0, 0, 0, 1, 0, 0, status, length)
    return head + reason


@pytest.mark.parametrize(
    ("frame", "error", "field", "offset", "value"),
    [
        (b"\x06\x00\x00\x1d", ShortFrameError, "message_header", 4, None),
        (
            struct.pack("<IBBHQ", 0x1D00_0001, 8, 0, 0, 0) + bytes(8),
            UnknownMessageTypeError,
            "message_type",
            0,
            0x1D00_0001,
        ),
        (struct.pack("<IBBHQ", HELLO, 7, 0, 0, 0) + bytes(7), FieldValueError, "payload_size", 4, 7),
        (struct.pack("<IBBHQ", HELLO, 241, 0, 0, 0) + bytes(241), FieldValueError, "payload_size", 4, 241),
        (struct.pack("<IBBHQ", HELLO, 8, 0, 0, 0) + bytes(6), ShortFrameError, "payload", 22, None),
    ],
)
def test_a_malformed_hello_names_field_offset_and_value(
    frame: bytes, error: type[FrameError], field: str, offset: int, value: int | None
) -> None:
    with pytest.raises(error) as raised:
        decode_hello(frame)
    assert (raised.value.field, raised.value.offset, raised.value.value) == (field, offset, value)
    assert f"{field} at offset {offset}" in str(raised.value)


@pytest.mark.parametrize(
    ("frame", "error", "field", "offset", "value"),
    [
        (encode_hello(Hello(vm=1)), UnknownMessageTypeError, "message_type", 0, HELLO),
        (struct.pack("<IBBHQ", HELLO_REPLY, 11, 0, 0, 0) + bytes(11), FieldValueError, "payload_size", 4, 11),
        (hello_reply_frame(status=4), FieldValueError, "status", 24, 4),
        (hello_reply_frame(status=0xFF), FieldValueError, "status", 24, 0xFF),
        (hello_reply_frame(length=5, reason=b"abcd"), FieldValueError, "reason_length", 26, 5),
        (hello_reply_frame(length=3, reason=b"a\xffc"), FieldValueError, "reason", 29, 0xFF),
        (hello_reply_frame(length=2, reason=b"a\xc3"), FieldValueError, "reason", 29, 0xC3),  # a cut character
        (hello_reply_frame(length=4, payload=16, reason=b"ab"), ShortFrameError, "payload", 30, None),
    ],
)
def test_a_malformed_hello_reply_names_field_offset_and_value(
    frame: bytes, error: type[FrameError], field: str, offset: int, value: int | None
) -> None:
    with pytest.raises(error) as raised:
        decode_hello_reply(frame)
    assert (raised.value.field, raised.value.offset, raised.value.value) == (field, offset, value)


def test_bytes_past_the_reason_are_ignored() -> None:
    frame = hello_reply_frame(status=2, length=2, reason=b"no" + b"\xff\xff")
    assert decode_hello_reply(frame).reason == "no"


@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_frame_errors(data: bytes) -> None:
    for decode in (decode_hello, decode_hello_reply):
        with contextlib.suppress(FrameError):
            decode(data)


@given(st.integers(0, 240), st.binary(min_size=0, max_size=240), st.sampled_from([HELLO, HELLO_REPLY]))
def test_arbitrary_payloads_under_a_valid_header_decode_or_raise_frame_errors(
    size: int, tail: bytes, kind: int
) -> None:
    frame = struct.pack("<IBBHQ", kind, size, 0, 0, 3) + tail
    for decode in (decode_hello, decode_hello_reply):
        with contextlib.suppress(FrameError):
            decode(frame)


@pytest.mark.parametrize(
    ("arguments", "name"),
    [((1 << 64, 1, 0), "vm"), ((0, 1 << 16, 0), "major"), ((-1, 1, 0), "vm"), ((0, 1, -1), "minor")],
)
def test_values_out_of_their_fields_are_refused_when_built(arguments: tuple[int, int, int], name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be within"):
        Hello(*arguments)
    with pytest.raises(ValueError, match=f"^{name} must be within"):
        HelloReply(*arguments)


def test_another_major_earns_a_refusal_naming_both_versions() -> None:
    assert version_refusal(Hello(vm=4, major=SESSION_MAJOR, minor=7)) is None
    refusal = version_refusal(Hello(vm=4, major=2, minor=5))
    assert refusal is not None
    assert (refusal.vm, refusal.status, refusal.major) == (4, HelloStatus.INCOMPATIBLE_VERSION, SESSION_MAJOR)
    assert "2.5" in refusal.reason and f"{SESSION_MAJOR}.{SESSION_MINOR}" in refusal.reason


# The service's reading of the first frame, over a real socket pair.


@pytest.fixture
async def sockets() -> AsyncIterator[tuple[UnixTransport, socket.socket]]:
    """The service's end as a transport, and the peer's as a plain blocking socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    transport = UnixTransport(ours, name="test connection")
    theirs.settimeout(30)
    with theirs:
        yield transport, theirs
        await transport.aclose()


def replies(peer: socket.socket) -> list[HelloReply]:
    """Every HELLO_REPLY the service sent before closing (the peer reads to end of stream)."""
    data = b""
    while chunk := peer.recv(4096):
        data += chunk
    found = []
    while data:
        size = 16 + data[4]
        found.append(decode_hello_reply(data[:size]))
        data = data[size:]
    return found


async def test_a_hello_is_read_and_nothing_after_it(sockets: tuple[UnixTransport, socket.socket]) -> None:
    transport, peer = sockets
    after = b"the next frame's bytes"
    peer.sendall(encode_hello(Hello(vm=12, minor=3, capabilities=Capability.GUEST_MEMORY)) + after)
    opening = await read_opening(transport, timeout=30)
    assert opening == Hello(vm=12, minor=3, capabilities=Capability.GUEST_MEMORY)
    assert transport.socket.recv(100) == after  # left for whoever serves the connection


async def test_a_hello_arriving_in_pieces_is_read(sockets: tuple[UnixTransport, socket.socket]) -> None:
    transport, peer = sockets
    frame = encode_hello(Hello(vm=2))

    async def dribble() -> None:
        for i in range(len(frame)):
            peer.send(frame[i : i + 1])
            await anyio.sleep(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(dribble)
        assert await read_opening(transport, timeout=30) == Hello(vm=2)


async def test_a_control_request_is_recognised_and_not_consumed(sockets: tuple[UnixTransport, socket.socket]) -> None:
    transport, peer = sockets
    request = encode_request(Request.STATS, request_id=5)
    peer.sendall(request)
    assert await read_opening(transport, timeout=30) == ControlRequestStart()
    assert await transport.receive_batch() == [request]


async def test_another_major_is_answered_incompatible_and_refused(
    sockets: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = sockets
    peer.sendall(encode_hello(Hello(vm=3, major=SESSION_MAJOR + 1)))
    with pytest.raises(OpeningError) as raised:
        await read_opening(transport, timeout=30)
    assert (raised.value.status, raised.value.vm) == (HelloStatus.INCOMPATIBLE_VERSION, 3)
    await transport.aclose()
    [reply] = replies(peer)
    assert (reply.vm, reply.status, reply.major) == (3, HelloStatus.INCOMPATIBLE_VERSION, SESSION_MAJOR)
    assert f"{SESSION_MAJOR + 1}.0" in reply.reason and f"{SESSION_MAJOR}.{SESSION_MINOR}" in reply.reason


@pytest.mark.parametrize(
    ("first", "words"),
    [
        (struct.pack("<IBBHQ", 0x8001_0000, 128, 0, 0, 6) + bytes(128), "must be a HELLO (type 0x1d000006)"),
        (struct.pack("<IBBHQ", HELLO, 4, 0, 0, 6) + bytes(4), "malformed HELLO: payload_size at offset 4 = 0x4"),
        (struct.pack("<IBBHQ", HELLO, 0xF5, 0, 0, 6), "malformed HELLO: payload_size at offset 4 = 0xf5"),
    ],
)
async def test_a_first_frame_that_is_not_a_good_hello_is_refused_naming_why(
    sockets: tuple[UnixTransport, socket.socket], first: bytes, words: str
) -> None:
    transport, peer = sockets
    peer.sendall(first)
    with pytest.raises(OpeningError, match=re.escape(words)) as raised:
        await read_opening(transport, timeout=30)
    assert (raised.value.status, raised.value.vm) == (HelloStatus.REFUSED, 6)
    await transport.aclose()
    [reply] = replies(peer)
    assert (reply.vm, reply.status) == (6, HelloStatus.REFUSED) and words in reply.reason


async def test_silence_is_refused_after_the_time_limit(sockets: tuple[UnixTransport, socket.socket]) -> None:
    transport, peer = sockets
    peer.sendall(encode_hello(Hello(vm=1))[:10])  # part of a header, then nothing
    with pytest.raises(OpeningError, match=r"^sent no complete HELLO within 0\.05 s$") as raised:
        await read_opening(transport, timeout=0.05)
    assert raised.value.status is HelloStatus.REFUSED
    await transport.aclose()
    assert [(r.vm, r.status) for r in replies(peer)] == [(0, HelloStatus.REFUSED)]  # the VM was not read yet


async def test_a_hello_cut_short_is_refused_to_the_vm_its_header_named(
    sockets: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = sockets
    peer.sendall(encode_hello(Hello(vm=7))[:20])  # the header, and half the payload
    with pytest.raises(OpeningError, match=r"^sent no complete HELLO within 0\.05 s$") as raised:
        await read_opening(transport, timeout=0.05)
    assert (raised.value.status, raised.value.vm) == (HelloStatus.REFUSED, 7)
    await transport.aclose()
    assert [(r.vm, r.status) for r in replies(peer)] == [(7, HelloStatus.REFUSED)]


@pytest.mark.parametrize("sent", [b"", b"\x06\x00", encode_hello(Hello(vm=1))[:20]])
async def test_a_peer_that_closes_early_gets_no_reply(
    sockets: tuple[UnixTransport, socket.socket], sent: bytes
) -> None:
    transport, peer = sockets
    peer.sendall(sent)
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(OpeningError, match="closed the connection") as raised:
        await read_opening(transport, timeout=30)
    assert raised.value.status is None


async def test_accept_sends_the_reply_and_then_frames_in_one_write(
    sockets: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = sockets
    await accept(transport, 8, capabilities=Capability.GUEST_MEMORY, then=[b"A" * 20])
    data = peer.recv(4096)
    reply = decode_hello_reply(data[:28])
    assert (reply.vm, reply.status, reply.capabilities) == (8, HelloStatus.ACCEPTED, Capability.GUEST_MEMORY)
    assert data[28:] == b"A" * 20


async def test_refuse_to_a_peer_gone_returns_false(sockets: tuple[UnixTransport, socket.socket]) -> None:
    transport, peer = sockets
    peer.close()
    assert await refuse(transport, 1, HelloStatus.NO_WORKER, "the worker did not start") is False
    with pytest.raises(ValueError, match="accept"):
        await refuse(transport, 1, HelloStatus.ACCEPTED, "")


async def test_a_hello_over_pipes_is_read_exactly() -> None:
    to_service, from_vmm = os.pipe()
    to_vmm, from_service = os.pipe()
    transport = PipeTransport(to_service, from_service, name="pipes")
    try:
        os.write(from_vmm, encode_hello(Hello(vm=77)) + b"rest")
        assert await read_opening(transport, timeout=30) == Hello(vm=77)
        assert os.read(to_service, 100) == b"rest"
        os.write(from_vmm, encode_request(Request.STATS))
        with pytest.raises(OpeningError, match="UNIX socket only") as raised:
            await read_opening(transport, timeout=30)
        assert raised.value.status is HelloStatus.REFUSED
        assert decode_hello_reply(os.read(to_vmm, 4096)).status is HelloStatus.REFUSED
    finally:
        await transport.aclose()
        os.close(from_vmm)
        os.close(to_vmm)


# The client against a fake service in process, over a socket pair.


async def fake_service(
    transport: UnixTransport,
    *,
    reply: HelloReply | None = None,
    seen: list[Hello | ControlRequestStart] | None = None,
) -> None:
    """Read the opening; send ``reply`` (default: accept, then announce port 0x80 and complete one intercept)."""
    try:
        opening = await read_opening(transport, timeout=30)
    except OpeningError:
        return
    if seen is not None:
        seen.append(opening)
    assert isinstance(opening, Hello)
    if reply is not None:
        await transport.send_batch([encode_hello_reply(reply)])
        return
    await accept(transport, opening.vm, capabilities=Capability.GUEST_MEMORY, then=encode_announcement([ANNOUNCED]))
    [frame] = await transport.receive_batch()
    intercept = decode_message(frame)
    await transport.send_batch([Completion(intercept.vp_index, source_partition=intercept.source_partition).to_bytes()])


ANNOUNCED = PortRange(0x80, 0x80, Access.READ | Access.WRITE)


def transport_pair() -> tuple[UnixTransport, UnixTransport]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return UnixTransport(a, name="service end"), UnixTransport(b, name="client end")


async def test_the_client_says_hello_first_and_then_exchanges() -> None:
    service, client_end = transport_pair()
    seen: list[Hello | ControlRequestStart] = []
    async with service, anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(fake_service, service, seen=seen))
        async with ServiceClient(client_end, vm=5, name="the fake service") as client:
            assert client.ports == [ANNOUNCED]
            assert client.reply is not None and client.reply.capabilities == Capability.GUEST_MEMORY
            completion = await client.exchange(io_intercept(0x80, 1, write=False, vp=2, partition=5))
            assert (completion.source_partition, completion.vp_index) == (5, 2)
    # A socket can carry guest memory; every client can send lifecycle verbs.
    assert seen == [Hello(vm=5, capabilities=Capability.GUEST_MEMORY | Capability.LIFECYCLE)]


async def test_over_pipes_the_client_offers_no_guest_memory() -> None:
    to_service, from_vmm = os.pipe()
    to_vmm, from_service = os.pipe()
    client_end = PipeTransport(to_vmm, from_vmm, name="pipes")
    os.set_blocking(to_service, True)
    async with client_end:
        with pytest.raises(TransportError, match=r"^pipes did not answer the HELLO within"):
            async with ServiceClient(client_end, vm=1, announce_timeout=0.01):
                pass
        assert decode_hello(os.read(to_service, 100)) == Hello(vm=1, capabilities=Capability.LIFECYCLE)
    os.close(to_service)
    os.close(from_service)


@pytest.mark.parametrize(
    ("reply", "error", "words"),
    [
        (
            HelloReply(vm=5, major=SESSION_MAJOR + 1, status=HelloStatus.INCOMPATIBLE_VERSION, reason="x"),
            IncompatibleVersionError,
            f"the fake service speaks session version {SESSION_MAJOR + 1}.0, "
            f"this client {SESSION_MAJOR}.{SESSION_MINOR}",
        ),
        (
            HelloReply(vm=5, major=SESSION_MAJOR + 1),  # accepted, but in a language this client cannot read
            IncompatibleVersionError,
            f"the fake service speaks session version {SESSION_MAJOR + 1}.0",
        ),
        (
            HelloReply(vm=5, status=HelloStatus.REFUSED, reason="VM 5 has 16 connections already"),
            SessionRefusedError,
            "the fake service refused VM 5: VM 5 has 16 connections already",
        ),
        (
            HelloReply(vm=5, status=HelloStatus.NO_WORKER, reason="the worker exited with status 1"),
            SessionRefusedError,
            "the fake service could not start a worker for VM 5: the worker exited with status 1",
        ),
        (HelloReply(vm=6), TransportError, "the fake service accepted VM 6, but this client's HELLO named VM 5"),
    ],
)
async def test_the_client_raises_what_the_hello_reply_says(
    reply: HelloReply, error: type[DispatchError], words: str
) -> None:
    service, client_end = transport_pair()
    async with service, anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(fake_service, service, reply=reply))
        with pytest.raises(error) as raised:
            async with ServiceClient(client_end, vm=5, name="the fake service"):
                pass
    assert str(raised.value).startswith(words)
    if isinstance(raised.value, IncompatibleVersionError):
        assert raised.value.ours == (SESSION_MAJOR, SESSION_MINOR)
        assert raised.value.theirs == (reply.major, reply.minor)
    if isinstance(raised.value, SessionRefusedError):
        assert (raised.value.status, raised.value.reason, raised.value.vm) == (reply.status, reply.reason, 5)


async def test_a_newer_client_is_refused_by_the_service_naming_both_versions() -> None:
    service, client_end = transport_pair()
    async with service, anyio.create_task_group() as tg:
        tg.start_soon(fake_service, service)
        client = ServiceClient(client_end, vm=5, name="the fake service")
        client.hello = Hello(vm=5, major=SESSION_MAJOR + 1)
        with pytest.raises(IncompatibleVersionError) as raised:
            async with client:
                pass
    ours = f"{SESSION_MAJOR}.{SESSION_MINOR}"
    assert str(raised.value) == (
        f"the fake service speaks session version {ours}, this client {SESSION_MAJOR + 1}.0 "
        "(the major versions must match)"
    )


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (b"", "the fake service closed the connection without answering the HELLO"),
        (encode_announcement([ANNOUNCED])[0], "the fake service sent a frame of type 0x1d000002 where its HELLO_REPLY"),
        (
            encode_hello_reply(HelloReply(vm=5))[:24] + b"\x09" + encode_hello_reply(HelloReply(vm=5))[25:],
            "the fake service sent a HELLO_REPLY that cannot be read: status at offset 24 = 0x9",
        ),
        (encode_hello_reply(HelloReply(vm=5)), "the fake service closed the connection before announcing its ports"),
    ],
)
async def test_a_service_that_breaks_the_opening_is_named(answer: bytes, words: str) -> None:
    service, client_end = transport_pair()

    async def answer_and_close() -> None:
        await read_opening(service, timeout=30)
        if answer:
            await service.send_batch([answer])
        await service.aclose()

    async with anyio.create_task_group() as tg:
        tg.start_soon(answer_and_close)
        with pytest.raises(TransportError) as raised:
            async with ServiceClient(client_end, vm=5, name="the fake service"):
                pass
    assert str(raised.value).startswith(words)


async def test_a_service_that_does_not_answer_in_time() -> None:
    service, client_end = transport_pair()
    async with service:
        with pytest.raises(TransportError, match=r"^the fake service did not answer the HELLO within 0\.01 s$"):
            async with ServiceClient(client_end, vm=5, announce_timeout=0.01, name="the fake service"):
                pass


# Who may serve a client: check_server, testable without a second user.


def test_check_server_refuses_a_uid_outside_the_allowed_set() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        me = os.geteuid()
        assert check_server(a, {me}).uid == me
        with pytest.raises(ServerIdentityError) as raised:
            check_server(a, {me + 1, me + 2}, path="/run/x.sock")
        assert (raised.value.uid, raised.value.pid, raised.value.path) == (me, os.getpid(), "/run/x.sock")
        assert str(raised.value).startswith(f"the socket /run/x.sock is served by uid {me} (pid {os.getpid()})")
        assert f"uids {me + 1}, {me + 2}" in str(raised.value)


def test_the_allowed_server_uids_are_ours_roots_and_those_named() -> None:
    me = os.geteuid()
    assert allowed_server_uids() == {me, 0}
    assert allowed_server_uids(1234) == {me, 0, 1234}
    assert allowed_server_uids([5, 6]) == {me, 0, 5, 6}


async def test_connect_service_refuses_an_impostor_before_sending_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        # The kernel reports our own uid for a listener we made; the check is told it is another user's.
        impostor = PeerCredentials(pid=1, uid=4242, gid=4242)
        monkeypatch.setattr(socket_path, "peer_credentials", lambda sock: impostor)
        with pytest.raises(ServerIdentityError, match=f"^the socket {re.escape(str(path))} is served by uid 4242"):
            async with connect_service(path, vm=1):
                pass
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(30)
            assert connection.recv(100) == b""  # closed, and no HELLO was sent


async def test_open_session_for_a_vmm_that_reads_the_transport_itself() -> None:
    service, client_end = transport_pair()
    async with service, client_end, anyio.create_task_group() as tg:
        tg.start_soon(fake_service, service)
        reply, ranges = await open_session(client_end, vm=9, where="the fake service", timeout=30)
        assert (reply.vm, reply.status, ranges) == (9, HelloStatus.ACCEPTED, [ANNOUNCED])
        await client_end.send_batch([io_intercept(0x80, 1, write=False, partition=9)])
        [completion] = await client_end.receive_batch()
        assert decode_completion(completion).source_partition == 9


async def test_open_session_raises_the_refusal() -> None:
    service, client_end = transport_pair()
    refusal = HelloReply(vm=9, status=HelloStatus.REFUSED, reason="this user may not run VM 9")
    async with service, client_end, anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(fake_service, service, reply=refusal))
        with pytest.raises(SessionRefusedError, match=r"^the fake service refused VM 9: this user may not run VM 9$"):
            await open_session(client_end, vm=9, where="the fake service", timeout=30)


@settings(max_examples=60)
@given(st.binary(max_size=300), st.sampled_from([b"", encode_hello(Hello(vm=3))[:4], struct.pack("<I", HELLO)]))
def test_read_opening_returns_or_raises_opening_error_whatever_arrives(data: bytes, start: bytes) -> None:
    async def main() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            theirs.sendall(start + data)
            theirs.shutdown(socket.SHUT_WR)
            transport = UnixTransport(ours, name="fuzzed")
            async with transport:
                with contextlib.suppress(OpeningError):
                    opening = await read_opening(transport, timeout=30)
                    assert isinstance(opening, Hello | ControlRequestStart)

    anyio.run(main)
