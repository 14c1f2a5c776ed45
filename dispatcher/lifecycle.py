"""Lifecycle verbs on a VMM's session connection: RESET, PAUSE, RESUME, SAVE, RESTORE, RELEASE, sans-I/O.

After its HELLO (with the :attr:`~dispatcher.hello.Capability.LIFECYCLE` bit,
and a HELLO_REPLY that sets it too), a VMM may send LIFECYCLE_REQUEST frames
among its intercepts; the service answers each with LIFECYCLE_REPLY frames
carrying the same RequestId. A request or reply whose document (RESTORE's
state, SAVE's answer, an error message) is longer than one frame spans
several, each saying where its bytes go (Offset), the last with FINAL set,
as a control reply does. docs/PROTOCOL.md has the byte tables.

::

    frames = encode_request(LifecycleRequest(vm=3, verb=Verb.SAVE, request_id=7))
    assembler = Assembler()
    for frame in frames:
        request = assembler.request(frame)      # None until the FINAL frame; FrameError if malformed
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, NamedTuple

from .errors import DispatchError, FieldValueError
from .wire import (
    HEADER_SIZE,
    LIFECYCLE_HEAD,
    LIFECYCLE_REPLY,
    LIFECYCLE_REQUEST,
    MAX_PAYLOAD,
    Offset,
    check_header,
    document_chunks,
)

__all__ = [
    "FINAL",
    "LIFECYCLE_VERSION",
    "MAX_CHUNK",
    "MAX_DOCUMENT",
    "MAX_PARTIAL",
    "Assembler",
    "LifecycleError",
    "LifecycleFrame",
    "LifecycleReply",
    "LifecycleRequest",
    "LifecycleStatus",
    "Verb",
    "decode_frame",
    "encode_reply",
    "encode_request",
]

LIFECYCLE_VERSION: Final = 1
"""The Version byte of lifecycle requests and replies."""
FINAL: Final = 1
"""Flags bit 0: the last frame of a request's or reply's document."""
MAX_CHUNK: Final = MAX_PAYLOAD - (LIFECYCLE_HEAD.size - HEADER_SIZE)
"""The most document bytes one lifecycle frame carries: 228."""
MAX_DOCUMENT: Final = 1 << 20
"""The longest document (RESTORE's state, SAVE's answer) either side accepts: 1 MiB."""
MAX_PARTIAL: Final = 4
"""Requests (or replies) whose document is still arriving, at most, per connection."""

_FIXED: Final = LIFECYCLE_HEAD.size - HEADER_SIZE
_REQUEST_ONLY: Final = frozenset({LIFECYCLE_REQUEST})
_REPLY_ONLY: Final = frozenset({LIFECYCLE_REPLY})


class Verb(enum.IntEnum):
    """What a lifecycle request asks of the VM its connection serves."""

    RESET = 1
    """Every device of the VM to its power-on state."""
    PAUSE = 2
    """No handler of the VM runs from now on: intercepts wait, in order, until RESUME."""
    RESUME = 3
    """Undo PAUSE: the waiting intercepts are dispatched, in the order they arrived."""
    SAVE = 4
    """Answer the VM's device state document (JSON, ``dispatcher.device_state``)."""
    RESTORE = 5
    """Replace the VM's device state with the request's document; all or nothing."""
    RELEASE = 6
    """Drop the VM's devices (and its saved state): its connections close after the reply."""


class LifecycleStatus(enum.IntEnum):
    """How the service answers a lifecycle request; anything but OK carries a message naming the problem."""

    OK = 0
    """Done; SAVE's reply carries the state document."""
    BAD_REQUEST = 1
    """The frame cannot be read as a request (the message names the field and its offset)."""
    UNKNOWN_VERB = 2
    """A Verb this service does not know (the message lists those it does)."""
    STATE_ERROR = 3
    """RESTORE: the document cannot be restored (the message names the device and the field); nothing changed.
    SAVE: a device could not save its state."""
    UNAVAILABLE = 4
    """The service cannot do it now (the VM is being released or the service is stopping)."""


class LifecycleFrame(NamedTuple):
    """One decoded lifecycle frame: a part of a request's or reply's document."""

    vm: int
    code: int
    """The request's Verb or the reply's Status, as sent (checked by :class:`Assembler`)."""
    final: bool
    request_id: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class LifecycleRequest:
    """A whole lifecycle request: the VM (the header's partition), the verb, its id and document (RESTORE's)."""

    vm: int
    verb: Verb
    request_id: int = 0
    document: bytes = b""


@dataclass(frozen=True, slots=True)
class LifecycleReply:
    """A whole lifecycle reply: its status, the request's id, and its document (SAVE's state, or a message)."""

    vm: int
    status: LifecycleStatus
    request_id: int = 0
    document: bytes = b""

    @property
    def message(self) -> str:
        """The document as text (an error reply's message)."""
        return self.document.decode(errors="replace")


class LifecycleError(DispatchError):
    """A lifecycle request the service did not carry out: ``status`` and ``verb`` say what, ``str()`` why."""

    def __init__(self, message: str, *, status: int, verb: int) -> None:
        super().__init__(message)
        self.status = status
        self.verb = verb


def _encode(kind: int, vm: int, code: int, request_id: int, document: bytes) -> list[bytes]:
    if len(document) > MAX_DOCUMENT:
        raise ValueError(f"a lifecycle document holds at most {MAX_DOCUMENT} bytes, not {len(document)}")
    return [
        LIFECYCLE_HEAD.pack(
            kind, _FIXED + len(chunk), 0, 0, 0, vm, LIFECYCLE_VERSION, code, FINAL if final else 0, request_id, offset
        )
        + chunk
        for offset, chunk, final in document_chunks(document, MAX_CHUNK)
    ]


def encode_request(request: LifecycleRequest) -> list[bytes]:
    """The request's frames (one, or more for a long document); ValueError past :data:`MAX_DOCUMENT`."""
    return _encode(LIFECYCLE_REQUEST, request.vm, request.verb, request.request_id, request.document)


def encode_reply(reply: LifecycleReply) -> list[bytes]:
    """The reply's frames (one, or more for a long document); ValueError past :data:`MAX_DOCUMENT`."""
    return _encode(LIFECYCLE_REPLY, reply.vm, reply.status, reply.request_id, reply.document)


def decode_frame(frame: bytes | bytearray | memoryview, *, reply: bool) -> LifecycleFrame:
    """Parse one lifecycle request frame (or reply frame, with ``reply``); raise a FrameError naming the field."""
    size = check_header(frame, _REPLY_ONLY if reply else _REQUEST_ONLY)
    _, _, _, _, _, vm, version, code, flags, request_id, offset = LIFECYCLE_HEAD.unpack_from(frame)
    if version != LIFECYCLE_VERSION:
        raise FieldValueError(
            f"this side speaks lifecycle version {LIFECYCLE_VERSION}",
            field="version",
            offset=Offset.LIFECYCLE_VERSION,
            value=version,
        )
    if flags & ~FINAL:
        raise FieldValueError(
            "flags other than FINAL (bit 0) are not defined", field="flags", offset=Offset.LIFECYCLE_FLAGS, value=flags
        )
    data = bytes(frame[Offset.LIFECYCLE_DATA : HEADER_SIZE + size])
    return LifecycleFrame(vm, code, bool(flags & FINAL), request_id, offset, data)


class Assembler:
    """Puts lifecycle documents back together from their frames, one per connection and direction.

    :meth:`request` (or :meth:`reply`) takes one frame and returns the whole
    request once its FINAL frame is in, else None. A frame whose Offset is
    not where the document stands, a document past ``max_document`` bytes, a
    verb or status not defined, or more than :data:`MAX_PARTIAL` documents
    arriving at once raise a :class:`~dispatcher.FieldValueError` naming the
    field (that request's partial document is dropped).
    """

    def __init__(self, max_document: int = MAX_DOCUMENT) -> None:
        self.max_document = max_document
        self._partial: dict[int, bytearray] = {}

    def _feed(self, part: LifecycleFrame) -> bytes | None:
        held = self._partial.get(part.request_id)
        have = 0 if held is None else len(held)
        if part.offset != have:
            self._partial.pop(part.request_id, None)
            raise FieldValueError(
                f"request {part.request_id}'s document has {have} bytes so far; a frame must continue it there",
                field="offset",
                offset=Offset.LIFECYCLE_OFFSET,
                value=part.offset,
            )
        if have + len(part.data) > self.max_document:
            self._partial.pop(part.request_id, None)
            raise FieldValueError(
                f"request {part.request_id}'s document passes the {self.max_document} bytes allowed",
                field="offset",
                offset=Offset.LIFECYCLE_OFFSET,
                value=part.offset,
            )
        if part.final:
            whole = bytes(held or b"") + part.data
            self._partial.pop(part.request_id, None)
            return whole
        if held is None:
            if len(self._partial) >= MAX_PARTIAL:
                raise FieldValueError(
                    f"more than {MAX_PARTIAL} lifecycle documents arriving at once",
                    field="request_id",
                    offset=Offset.LIFECYCLE_REQUEST_ID,
                    value=part.request_id,
                )
            held = self._partial[part.request_id] = bytearray()
        held += part.data
        return None

    def request(self, frame: bytes | bytearray | memoryview) -> LifecycleRequest | None:
        """Take one request frame; the whole request once its FINAL frame has come, else None."""
        part = decode_frame(frame, reply=False)
        try:
            verb = Verb(part.code)
        except ValueError:
            self._partial.pop(part.request_id, None)
            known = ", ".join(f"{v.value} {v.name}" for v in Verb)
            raise FieldValueError(
                f"not a verb this version defines ({known})",
                field="verb",
                offset=Offset.LIFECYCLE_VERB,
                value=part.code,
            ) from None
        document = self._feed(part)
        return None if document is None else LifecycleRequest(part.vm, verb, part.request_id, document)

    def reply(self, frame: bytes | bytearray | memoryview) -> LifecycleReply | None:
        """Take one reply frame; the whole reply once its FINAL frame has come, else None."""
        part = decode_frame(frame, reply=True)
        try:
            status = LifecycleStatus(part.code)
        except ValueError:
            self._partial.pop(part.request_id, None)
            raise FieldValueError(
                "not a lifecycle status this version defines (0-4)",
                field="status",
                offset=Offset.LIFECYCLE_VERB,
                value=part.code,
            ) from None
        document = self._feed(part)
        return None if document is None else LifecycleReply(part.vm, status, part.request_id, document)
