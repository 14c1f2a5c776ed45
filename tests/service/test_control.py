"""Control request and reply frames, byte by byte as docs/PROTOCOL.md draws them, and a control connection."""

from __future__ import annotations

import json
import struct

import anyio
import pytest

from dispatcher import FieldValueError, ShortFrameError, UnknownMessageTypeError
from dispatcher.wire import CONTROL_REPLY, CONTROL_REQUEST, check_header
from transports.memory import memory_transport_pair
from transports.service.control import (
    CHUNK_SIZE,
    ControlRequest,
    Reply,
    Request,
    Status,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    serve_control,
)

pytestmark = pytest.mark.anyio


def test_a_request_byte_by_byte() -> None:
    frame = encode_request(Request.INSPECT, vm=0x1122, request_id=0xAABBCCDD)
    assert len(frame) == 24
    assert frame[:8] == struct.pack("<IBBH", 0x1D00_0004, 8, 0, 0)
    assert frame[8:16] == (0x1122).to_bytes(8, "little")  # SourcePartition: the VM asked about
    assert frame[16:20] == bytes([1, 2, 1, 0])  # Version 1, INSPECT, ONE_VM, reserved
    assert frame[20:24] == (0xAABBCCDD).to_bytes(4, "little")
    assert decode_request(frame) == ControlRequest(Request.INSPECT, 0xAABBCCDD, 0x1122)
    assert decode_request(encode_request(Request.STATS)) == ControlRequest(Request.STATS, 0, None)


def test_a_reply_byte_by_byte() -> None:
    [frame] = encode_reply(b'{"a":1}', status=Status.OK, request_id=7, partition=3)
    assert len(frame) == 28 + 7
    assert frame[:8] == struct.pack("<IBBH", 0x1D00_0005, 12 + 7, 0, 0)
    assert frame[8:16] == (3).to_bytes(8, "little")
    assert frame[16:20] == bytes([1, 1, 0, 0])  # Version 1, FINAL, Status OK, reserved
    assert frame[20:28] == struct.pack("<II", 7, 0)  # RequestId, Offset
    assert frame[28:] == b'{"a":1}'
    assert check_header(frame, frozenset({CONTROL_REPLY})) == 19


def test_a_long_document_spans_frames_with_offsets_and_final_on_the_last() -> None:
    document = bytes(range(256)) * 3
    frames = encode_reply(document, request_id=9)
    assert len(frames) == -(-len(document) // CHUNK_SIZE) and CHUNK_SIZE == 228
    chunks = [decode_reply(frame) for frame in frames]
    assert [c.offset for c in chunks] == list(range(0, len(document), CHUNK_SIZE))
    assert [c.final for c in chunks] == [False] * (len(frames) - 1) + [True]
    assert b"".join(c.data for c in chunks) == document
    assert all(len(frame) <= 256 for frame in frames)


def test_an_empty_document_is_one_final_frame() -> None:
    [frame] = encode_reply(b"", status=Status.NO_SUCH_VM)
    chunk = decode_reply(frame)
    assert (chunk.final, chunk.status, chunk.data, len(frame)) == (True, Status.NO_SUCH_VM, b"", 28)


@pytest.mark.parametrize(
    ("frame", "error", "offset"),
    [
        (encode_request(Request.STATS)[:20], ShortFrameError, 20),
        (struct.pack("<I", 0x1D00_0001) + encode_request(Request.STATS)[4:], UnknownMessageTypeError, 0),
        (encode_request(Request.STATS)[:4] + bytes([4]) + encode_request(Request.STATS)[5:20], FieldValueError, 4),
        (encode_request(Request.STATS)[:16] + bytes([2]) + encode_request(Request.STATS)[17:], FieldValueError, 16),
        (encode_request(Request.STATS)[:18] + bytes([0x80]) + encode_request(Request.STATS)[19:], FieldValueError, 18),
    ],
    ids=["short", "not a request", "payload too small", "version 2", "unknown flag"],
)
def test_a_bad_request_names_its_field(frame: bytes, error: type[Exception], offset: int) -> None:
    with pytest.raises(error) as raised:
        decode_request(frame)
    assert getattr(raised.value, "offset", None) == offset


async def test_a_control_connection_answers_in_order_and_refuses_what_is_not_a_request() -> None:
    tool, service = memory_transport_pair()
    asked: list[ControlRequest] = []

    def answer(request: ControlRequest) -> Reply:
        asked.append(request)
        if request.kind == Request.STATS:
            return Reply(Status.OK, json.dumps({"n": "x" * 500}).encode())
        return Reply(Status.UNKNOWN_REQUEST, b"unknown")

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve_control, service, answer)
        intercept = bytes(struct.pack("<IBBH", 0x8001_0000, 128, 0, 0)) + bytes(136)
        await tool.send_batch(
            [encode_request(Request.STATS, request_id=1), encode_request(77, request_id=2), intercept]
        )
        chunks = [decode_reply(frame) for frame in await tool.receive_batch()]
        await tool.aclose()
    first = [c for c in chunks if c.request_id == 1]
    assert json.loads(b"".join(c.data for c in first)) == {"n": "x" * 500} and first[-1].final
    second, third = chunks[len(first) :]
    assert (second.request_id, second.status, second.final) == (2, Status.UNKNOWN_REQUEST, True)
    assert third.status == Status.BAD_REQUEST and b"not a control request" in third.data
    assert [r.kind for r in asked] == [Request.STATS, 77]


def test_the_types_are_this_protocols() -> None:
    assert (CONTROL_REQUEST, CONTROL_REPLY) == (0x1D00_0004, 0x1D00_0005)
