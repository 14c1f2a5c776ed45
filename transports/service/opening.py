"""The service's side of a connection's opening: read the first frame, then accept or refuse.

A VMM's connection opens with a HELLO (:mod:`dispatcher.hello`); a tool's
with a control request (:mod:`.control`). :func:`read_opening` tells the
two apart and reads the HELLO, within a time limit and never more than the
one frame: the bytes after it stay in the socket for whoever serves the
connection next (a worker process may receive the descriptor). A control
request is only peeked at, not read. Anything else earns a HELLO_REPLY
REFUSED saying why, where a reply makes sense, and an :class:`OpeningError`
for the caller, which closes the connection.

::

    opening = await read_opening(transport, timeout=5.0)
    if isinstance(opening, ControlRequestStart):
        await serve_control(transport, answer)
    else:
        await accept(transport, opening.vm, capabilities=Capability.GUEST_MEMORY, then=announcement)
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import anyio

from dispatcher import DispatchError, FrameError, Transport, TransportError
from dispatcher.hello import (
    Capability,
    Hello,
    HelloReply,
    HelloStatus,
    decode_hello,
    encode_hello_reply,
    version_refusal,
)
from dispatcher.wire import CONTROL_REQUEST, HEADER, HEADER_SIZE, HELLO, MAX_PAYLOAD, SLOT_SIZE, payload_size

from ..fdstream import READ_SIZE, FdStreamTransport
from ..unix import UnixTransport

__all__ = [
    "DEFAULT_OPENING_TIMEOUT",
    "MAX_OPENING",
    "REPLY_TIMEOUT",
    "ControlRequestStart",
    "OpeningError",
    "accept",
    "read_opening",
    "refuse",
]

DEFAULT_OPENING_TIMEOUT: Final = 5.0
"""Seconds a new connection has to send its whole first frame (``serve --opening-timeout``)."""
MAX_OPENING: Final = SLOT_SIZE
"""The most bytes :func:`read_opening` reads: one frame, whose PayloadSize is at most 240."""
REPLY_TIMEOUT: Final = 1.0
"""Seconds :func:`refuse` waits to hand its reply to a peer that does not read."""

_DISCARD_READS = 16  # at most 1 MiB dropped before closing a refused connection
_PARTIAL_POLL = 0.01  # a socket that holds part of a MessageType: look again this soon


@dataclass(frozen=True, slots=True)
class ControlRequestStart:
    """The connection opens with a control request: a tool, not a VMM. Nothing of it has been read."""


class OpeningError(DispatchError):
    """A connection's opening that cannot be accepted: the caller closes the connection.

    ``status`` is the HELLO_REPLY status already sent to say why (None when
    no reply was sent: the peer sent nothing, or went away); ``vm`` is the
    VM its header named, when it got that far.
    """

    def __init__(self, message: str, *, status: HelloStatus | None, vm: int | None) -> None:
        super().__init__(message)
        self.status = status
        self.vm = vm


async def refuse(
    transport: Transport,
    vm: int,
    status: HelloStatus,
    reason: str,
    *,
    capabilities: Capability = Capability.NONE,
) -> bool:
    """Send a HELLO_REPLY with ``status`` (not ACCEPTED) and ``reason``; True if it was sent.

    A peer that has gone, or does not take the reply within
    :data:`REPLY_TIMEOUT` seconds, is not waited for: the caller closes the
    connection either way.
    """
    if status is HelloStatus.ACCEPTED:
        raise ValueError("refuse() sends a refusal; accept() sends ACCEPTED")
    frame = encode_hello_reply(HelloReply(vm, capabilities=capabilities, status=status, reason=reason))
    sent = False
    with anyio.move_on_after(REPLY_TIMEOUT):
        try:
            await transport.send_batch([frame])
            sent = True
        except TransportError:
            pass
    if sent and isinstance(transport, UnixTransport):
        _discard_unread(transport.socket)
    return sent


def _discard_unread(sock: socket.socket) -> None:
    # Closing a UNIX socket with unread bytes resets the connection, and the peer's
    # next read fails with ECONNRESET before it gets to the reply: drop what has arrived.
    for _ in range(_DISCARD_READS):
        try:
            if not sock.recv(READ_SIZE, socket.MSG_DONTWAIT):
                return
        except OSError:
            return


async def accept(
    transport: Transport, vm: int, *, capabilities: Capability = Capability.NONE, then: Sequence[bytes] = ()
) -> None:
    """Send the HELLO_REPLY ACCEPTED for ``vm``, and the frames ``then`` (the port announcement) in the same write."""
    await transport.send_batch([encode_hello_reply(HelloReply(vm, capabilities=capabilities)), *then])


async def read_opening(
    transport: FdStreamTransport,
    timeout: float = DEFAULT_OPENING_TIMEOUT,
    *,
    capabilities: Capability = Capability.NONE,
) -> Hello | ControlRequestStart:
    """Read a new connection's first frame within ``timeout`` seconds.

    Returns the :class:`~dispatcher.hello.Hello` of a VMM that speaks this
    service's major version (the HELLO's bytes consumed, nothing after
    them), or :class:`ControlRequestStart` when the first frame is a control
    request (not consumed; UNIX sockets only). Raises :class:`OpeningError`
    for everything else: nothing within ``timeout`` (REFUSED), end of stream
    (no reply), a first frame of another type or a malformed HELLO (REFUSED,
    naming the field and offset), another major version
    (INCOMPATIBLE_VERSION, naming both). ``capabilities`` go in those
    replies. Call it before anything else reads the transport.
    """
    reader = _SocketReader(transport.socket) if isinstance(transport, UnixTransport) else _FdReader(transport)
    outcome: Hello | ControlRequestStart | _Refusal | None = None
    with anyio.move_on_after(timeout):
        try:
            outcome = await _first_frame(reader)
        except _EndOfStream as end:
            raise OpeningError(f"closed the connection in the middle of {end}", status=None, vm=reader.vm) from None
        except OSError as error:
            raise OpeningError(
                f"its first frame could not be read: {error.strerror or error}", status=None, vm=reader.vm
            ) from None
    if outcome is None:
        vm = 0 if reader.vm is None else reader.vm  # the header's VM, if it came
        outcome = _Refusal(vm, HelloStatus.REFUSED, f"sent no complete HELLO within {timeout:g} s")
    elif not isinstance(outcome, _Refusal):
        return outcome
    # Replies go out after the time limit's scope: a refusal is sent even when the limit caused it.
    sent = await refuse(transport, outcome.vm, outcome.status, outcome.reason, capabilities=capabilities)
    raise OpeningError(outcome.reason, status=outcome.status if sent else None, vm=outcome.vm)


@dataclass(frozen=True, slots=True)
class _Refusal:
    vm: int
    status: HelloStatus
    reason: str


async def _first_frame(reader: _SocketReader | _FdReader) -> Hello | ControlRequestStart | _Refusal:
    kind = await reader.first_type()
    if kind is None:
        raise OpeningError("closed the connection before its first frame", status=None, vm=None)
    if kind == CONTROL_REQUEST and isinstance(reader, _SocketReader):
        return ControlRequestStart()
    header = await reader.read(HEADER_SIZE, what="its first frame's header")
    vm: int = HEADER.unpack(header)[5]
    reader.vm = vm
    if kind == CONTROL_REQUEST:
        return _Refusal(vm, HelloStatus.REFUSED, "control requests are served on the UNIX socket only, not over pipes")
    if kind != HELLO:
        return _Refusal(
            vm,
            HelloStatus.REFUSED,
            f"the first frame must be a HELLO (type {HELLO:#x}) or a control request (type {CONTROL_REQUEST:#x}), "
            f"not type {kind:#x}",
        )
    size, _ = payload_size(header)
    # A PayloadSize over the maximum cannot be delimited: the header alone earns the error naming it.
    frame = header if size > MAX_PAYLOAD else header + await reader.read(size, what="its HELLO")
    try:
        hello = decode_hello(frame)
    except FrameError as error:
        return _Refusal(vm, HelloStatus.REFUSED, f"malformed HELLO: {error}")
    refusal = version_refusal(hello)
    if refusal is not None:
        return _Refusal(vm, refusal.status, refusal.reason)
    return hello


class _EndOfStream(Exception):
    """The peer closed while a frame was part-way read; ``str()`` names what was being read."""


class _SocketReader:
    """Peeks at the MessageType and reads exact byte counts from a non-blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.vm: int | None = None  # the header's SourcePartition, once read

    async def first_type(self) -> int | None:
        while True:
            try:
                head = self.sock.recv(4, socket.MSG_PEEK)
            except BlockingIOError:
                await anyio.wait_readable(self.sock)
                continue
            if not head:
                return None
            if len(head) == 4:
                return int.from_bytes(head, "little")
            # Part of a MessageType so far. The socket stays readable, so waiting for that
            # would spin: look again shortly, unless the peer has already closed its end.
            hung_up = select.poll()
            hung_up.register(self.sock, select.POLLRDHUP)
            if hung_up.poll(0):
                raise _EndOfStream("its first frame's MessageType")
            await anyio.sleep(_PARTIAL_POLL)

    async def read(self, count: int, *, what: str) -> bytes:
        data = b""
        while len(data) < count:
            try:
                chunk = self.sock.recv(count - len(data))
            except BlockingIOError:
                await anyio.wait_readable(self.sock)
                continue
            if not chunk:
                raise _EndOfStream(what)
            data += chunk
        return data


class _FdReader:
    """Reads exact byte counts from a stream transport's non-blocking read descriptor (a pipe: no peeking)."""

    def __init__(self, transport: FdStreamTransport) -> None:
        self.fd = transport._read_fd
        self.held = b""
        self.vm: int | None = None  # the header's SourcePartition, once read

    async def first_type(self) -> int | None:
        try:
            self.held = await self.read(4, what="its first frame's MessageType")
        except _EndOfStream:
            if not self.held:
                return None
            raise
        return int.from_bytes(self.held, "little")

    async def read(self, count: int, *, what: str) -> bytes:
        # The MessageType read by first_type() is handed out again as the start of the header.
        data, self.held = self.held[:count], self.held[count:]
        while len(data) < count:
            try:
                chunk = os.read(self.fd, count - len(data))
            except BlockingIOError:
                await anyio.wait_readable(self.fd)
                continue
            if not chunk:
                self.held = data
                raise _EndOfStream(what)
            data += chunk
        return data
