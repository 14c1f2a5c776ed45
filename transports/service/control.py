"""Control requests: what a tool asks a running service on its socket, and the documents it gets back.

A tool (``intercept-dispatch stats``, ``inspect``) connects to the service's
UNIX socket like a VMM, and sends a control request as the **first** frame
of the connection; that makes it a control connection, which carries only
control requests and their replies, never intercepts. The service answers
each request with a JSON document cut into reply frames, the last with
FINAL set, as it does with the port announcement. The layouts are
``wire.CONTROL_REQUEST_STRUCT`` and ``wire.CONTROL_REPLY_HEAD``;
docs/PROTOCOL.md ("Control requests") has them byte by byte.

::

    document = await control_request("/run/user/1000/intercept-dispatch.sock", Request.STATS)
"""

from __future__ import annotations

import enum
import inspect
import json
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple

import anyio

from dispatcher import DispatchError, FieldValueError, FrameError, Transport, TransportClosedError, TransportError
from dispatcher.wire import (
    CONTROL_REPLY,
    CONTROL_REPLY_HEAD,
    CONTROL_REQUEST,
    CONTROL_REQUEST_STRUCT,
    HEADER_SIZE,
    MAX_PAYLOAD,
    Offset,
    check_header,
    document_chunks,
    frame_ids,
    message_type,
)

from ..socket_path import allowed_server_uids, check_server
from ..unix import connect_unix

__all__ = [
    "CHUNK_SIZE",
    "CONTROL_TYPES",
    "CONTROL_VERSION",
    "ControlError",
    "ControlReply",
    "ControlRequest",
    "Reply",
    "Request",
    "Status",
    "control_request",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "serve_control",
]

CONTROL_VERSION = 1
CONTROL_TYPES = frozenset({CONTROL_REQUEST})
"""The message types that make a connection a control connection when they come first."""
ONE_VM = 0x01
"""Request flag: only the VM whose id is the request's SourcePartition."""
FINAL = 0x01
"""Reply flag: the last frame of this reply."""
CHUNK_SIZE = MAX_PAYLOAD - (CONTROL_REPLY_HEAD.size - HEADER_SIZE)
"""Document bytes one reply frame carries at most: 228."""
MAX_DOCUMENT = 16 << 20
"""The longest reply a client accepts."""

_REQUEST_PAYLOAD = CONTROL_REQUEST_STRUCT.size - HEADER_SIZE
_REQUEST_ONLY = frozenset({CONTROL_REQUEST})
_REPLY_ONLY = frozenset({CONTROL_REPLY})


class Request(enum.IntEnum):
    """What a control request asks for."""

    STATS = 1
    """Counts and latency: the service's, each device's and each VM's (docs/SERVICE.md, "stats")."""
    INSPECT = 2
    """The device objects behind the claims, their ports and their register-like attributes."""


class Status(enum.IntEnum):
    """How a control reply answers. With anything but OK the document is a UTF-8 message, not JSON."""

    OK = 0
    BAD_REQUEST = 1
    UNKNOWN_REQUEST = 2
    NO_SUCH_VM = 3


_STATUSES = frozenset(Status)


class ControlRequest(NamedTuple):
    """One decoded control request; ``vm`` is None unless the request names one VM."""

    kind: int
    request_id: int
    vm: int | None


class ControlReply(NamedTuple):
    """One decoded reply frame: a chunk of the document at ``offset``."""

    partition: int
    final: bool
    status: int
    request_id: int
    offset: int
    data: bytes


class Reply(NamedTuple):
    """What the service answers to a request: a status and the document's bytes."""

    status: Status
    document: bytes


class ControlError(DispatchError):
    """The service answered a control request with an error status; ``str()`` is its message."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


def encode_request(kind: int, *, vm: int | None = None, request_id: int = 0) -> bytes:
    """A control request frame; ``vm`` (a partition id) restricts it to that VM."""
    return CONTROL_REQUEST_STRUCT.pack(
        CONTROL_REQUEST,
        _REQUEST_PAYLOAD,
        0,
        0,
        0,
        0 if vm is None else vm,
        CONTROL_VERSION,
        kind,
        0 if vm is None else ONE_VM,
        request_id,
    )


def decode_request(frame: bytes) -> ControlRequest:
    """Parse a control request; raise a :class:`~dispatcher.FrameError` naming the bad field and its offset.

    The request kind is not checked here: an unknown one earns its own reply status.
    """
    check_header(frame, _REQUEST_ONLY)
    *_, partition, version, kind, flags, request_id = CONTROL_REQUEST_STRUCT.unpack_from(frame)
    if version != CONTROL_VERSION:
        raise FieldValueError(
            f"control requests are version {CONTROL_VERSION}",
            field="version",
            offset=Offset.CONTROL_VERSION,
            value=version,
        )
    if flags & ~ONE_VM:
        raise FieldValueError(
            "unknown control request flags", field="flags", offset=Offset.CONTROL_REQUEST_FLAGS, value=flags
        )
    return ControlRequest(kind, request_id, partition if flags & ONE_VM else None)


def encode_reply(document: bytes, *, status: int = Status.OK, request_id: int = 0, partition: int = 0) -> list[bytes]:
    """A reply as frames of at most :data:`CHUNK_SIZE` document bytes each (at least one frame)."""
    frames = []
    for start, chunk, final in document_chunks(document, CHUNK_SIZE):
        head = CONTROL_REPLY_HEAD.pack(
            CONTROL_REPLY,
            CONTROL_REPLY_HEAD.size - HEADER_SIZE + len(chunk),
            0,
            0,
            0,
            partition,
            CONTROL_VERSION,
            FINAL if final else 0,
            status,
            request_id,
            start,
        )
        frames.append(head + chunk)
    return frames


def decode_reply(frame: bytes) -> ControlReply:
    """Parse one reply frame; raise a :class:`~dispatcher.FrameError` naming the bad field and its offset.

    A Version other than 1 or a Status this version does not define is an error.
    """
    size = check_header(frame, _REPLY_ONLY)
    *_, partition, version, flags, status, request_id, offset = CONTROL_REPLY_HEAD.unpack_from(frame)
    if version != CONTROL_VERSION:
        raise FieldValueError(
            f"control replies are version {CONTROL_VERSION}",
            field="version",
            offset=Offset.CONTROL_VERSION,
            value=version,
        )
    if status not in _STATUSES:
        raise FieldValueError(
            f"not a control reply status this version defines ({min(_STATUSES)}-{max(_STATUSES)})",
            field="status",
            offset=Offset.CONTROL_REPLY_STATUS,
            value=status,
        )
    data = bytes(frame[Offset.CONTROL_REPLY_DATA : HEADER_SIZE + size])
    return ControlReply(partition, bool(flags & FINAL), status, request_id, offset, data)


async def serve_control(transport: Transport, answer: Callable[[ControlRequest], Reply | Awaitable[Reply]]) -> None:
    """Answer control requests on ``transport`` until the tool closes it.

    ``answer`` builds the reply to one well-formed request: synchronously
    in one process (the document is then a snapshot taken between two
    handler calls), or awaited where it must ask the VMs' worker processes;
    a frame that is not a request is answered with BAD_REQUEST and a message
    saying why.
    """
    while frames := await transport.receive_batch():
        replies: list[bytes] = []
        for frame in frames:
            partition = frame_ids(frame)[0]
            try:
                request = decode_request(frame)
            except FrameError as error:
                message = f"not a control request: {error}".encode()
                replies += encode_reply(message, status=Status.BAD_REQUEST, partition=partition)
                continue
            reply = answer(request)
            if inspect.isawaitable(reply):
                reply = await reply
            replies += encode_reply(
                reply.document, status=reply.status, request_id=request.request_id, partition=partition
            )
        await transport.send_batch(replies)


async def control_request(
    path: str | os.PathLike[str],
    kind: Request,
    *,
    vm: int | None = None,
    timeout: float = 5.0,
    server_uid: int | Iterable[int] | None = None,
) -> Any:
    """Ask the service listening at ``path``; return the reply's JSON document, decoded.

    Raises ``OSError`` when nothing listens there, ``TimeoutError`` after
    ``timeout`` seconds without the whole reply, :class:`ControlError` when
    the service answers with an error status,
    :class:`~transports.socket_path.ServerIdentityError` (before sending
    anything) when the listener is run by a user other than this one, root
    or ``server_uid``, and another :class:`~dispatcher.DispatchError` when
    the connection breaks or what comes back is not a reply.
    """
    where = f"the service at {os.fspath(path)}"
    with anyio.fail_after(timeout):
        transport = await connect_unix(path, name=where)
        async with transport:
            check_server(transport.socket, allowed_server_uids(server_uid), path=path)
            try:
                await transport.send_batch([encode_request(kind, vm=vm, request_id=1)])
                reply = await _read_reply(transport, request_id=1, where=where)
            except TransportClosedError:
                # A service refuses a user not in its --allow-uid by closing at once.
                raise TransportClosedError(
                    f"{where} closed the connection without answering (is this user allowed to connect? "
                    "see its --allow-uid)"
                ) from None
    if reply.status is not Status.OK:
        raise ControlError(reply.status, reply.document.decode(errors="replace"))
    try:
        return json.loads(reply.document)
    except ValueError as error:
        raise TransportError(f"{where}: its reply is not a JSON document: {error}") from None


async def _read_reply(transport: Transport, *, request_id: int, where: str) -> Reply:
    document = bytearray()
    while frames := await transport.receive_batch():
        for frame in frames:
            kind = message_type(frame)
            if kind != CONTROL_REPLY:
                raise TransportError(f"{where} sent a frame of type {kind:#x} instead of a control reply")
            try:
                chunk = decode_reply(frame)
            except FrameError as error:
                raise TransportError(f"{where} sent a control reply that cannot be read: {error}") from None
            if chunk.request_id != request_id or chunk.offset != len(document):
                raise TransportError(
                    f"{where} sent a control reply chunk for request {chunk.request_id} at offset {chunk.offset} "
                    f"where request {request_id} at offset {len(document)} was due"
                )
            document += chunk.data
            if len(document) > MAX_DOCUMENT:
                raise TransportError(f"{where} sent a reply longer than {MAX_DOCUMENT} bytes")
            if chunk.final:
                return Reply(Status(chunk.status), bytes(document))
    raise TransportClosedError("end of stream before the reply")
