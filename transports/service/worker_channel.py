"""The supervisor's line to one worker process: small JSON messages, descriptors beside them.

A ``socketpair`` (a UNIX stream socket) carries messages, each a 4-byte
little-endian length and that many bytes of a JSON object whose ``op`` says
what it is. A message may carry descriptors (SCM_RIGHTS): a VMM connection
handed to the worker travels this way; its ``fds`` field says how many
belong to it. Either side learns that the other has gone from the end of the
stream, so a worker never outlives its supervisor for long.

The messages (docs/SERVICE.md, "Processes"):

* supervisor -> worker: ``start`` (the devices, options and limits; with
  ``serve --state-dir``, ``save_on_stop`` and the VM's saved ``state`` and
  its ``state_path`` if there is one; the first message), ``connection``
  (one VMM connection, its descriptor attached, after its HELLO),
  ``stats`` and ``inspect`` (with an ``id``), ``stop`` (graceful: finish
  the intercepts in flight, then exit).
* worker -> supervisor: ``ready`` (devices loaded, the saved state
  ``restored``, sandbox applied: the ports it claims) or ``failed`` (why it
  cannot serve; ``state`` when its state file is at fault), ``closed`` (a
  connection ended), ``reply`` (to a ``stats`` or ``inspect`` of that
  ``id``), ``hung`` (a handler hung: the worker exits next), ``released``
  (a RELEASE was answered: the worker exits next, and the VM is
  forgotten), ``state`` (its device state, once stopped, for the
  supervisor to write: a worker opens no file).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import struct
from collections import deque
from collections.abc import Sequence
from typing import Any

import anyio

from dispatcher import DispatchError

from ..unix import fds_ancillary, received_fds

__all__ = ["MAX_MESSAGE", "Channel", "ChannelClosedError", "ChannelError", "channel_pair"]

MAX_MESSAGE = 64 << 20
"""The longest message either side accepts (an inspection document of many devices fits)."""
MAX_FDS = 8
"""Descriptors one message may carry."""

_LENGTH = struct.Struct("<I")
_FD_SIZE = array.array("i").itemsize
_READ_SIZE = 1 << 16


class ChannelError(DispatchError):
    """The other side sent something that is not a message of this channel; ``str()`` says what."""


class ChannelClosedError(ChannelError):
    """The other side has gone (its process ended or it closed its end)."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected sockets: the supervisor's end and the one a worker inherits (inheritable)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.set_inheritable(True)
    return ours, theirs


class Channel:
    """One end of a supervisor-worker channel; ``name`` says whose in errors.

    Sending is safe from several tasks at once (a lock keeps messages whole);
    one task receives.
    """

    def __init__(self, sock: socket.socket, *, name: str) -> None:
        sock.setblocking(False)
        self.socket = sock
        self.name = name
        self._buffer = bytearray()
        self._fds: deque[int] = deque()
        self._lock = anyio.Lock()
        self._closed = False
        self._eof = False

    async def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Send ``message`` (a JSON object) with ``fds`` attached; the caller keeps its own descriptors.

        Raises :class:`ChannelClosedError` when the other side has gone.
        """
        if len(fds) > MAX_FDS:
            raise ValueError(f"a message carries at most {MAX_FDS} descriptors, not {len(fds)}")
        body = json.dumps({**message, "fds": len(fds)}, separators=(",", ":")).encode()
        view = memoryview(_LENGTH.pack(len(body)) + body)
        ancillary = fds_ancillary(fds)
        async with self._lock:
            while view:
                if self._closed:
                    raise ChannelClosedError(f"{self.name}: the channel is closed")
                try:
                    sent = self.socket.sendmsg([view], ancillary)
                except BlockingIOError:
                    await self._wait(anyio.wait_writable)
                    continue
                except OSError as error:
                    raise ChannelClosedError(f"{self.name}: the other side has gone ({error.strerror})") from None
                view, ancillary = view[sent:], []  # the descriptors went with the first byte

    async def receive(self) -> tuple[dict[str, Any], list[int]]:
        """The next message and the descriptors that came with it (the caller owns and closes them).

        Raises :class:`ChannelClosedError` at the end of the stream, and
        :class:`ChannelError` for bytes that are not a message.
        """
        while True:
            message = self._next()
            if message is not None:
                return message
            if self._eof or self._closed:
                raise ChannelClosedError(f"{self.name}: the other side has gone")
            try:
                data, ancillary, flags, _ = self.socket.recvmsg(_READ_SIZE, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE))
            except BlockingIOError:
                await self._wait(anyio.wait_readable)
                continue
            except OSError as error:
                raise ChannelClosedError(f"{self.name}: the other side has gone ({error.strerror})") from None
            self._fds.extend(received_fds(ancillary))
            if flags & socket.MSG_CTRUNC:
                raise ChannelError(f"{self.name}: more than {MAX_FDS} descriptors arrived at once")
            if not data:
                self._eof = True
            self._buffer += data

    def _next(self) -> tuple[dict[str, Any], list[int]] | None:
        if len(self._buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        if length > MAX_MESSAGE:
            raise ChannelError(f"{self.name}: a message of {length} bytes (at most {MAX_MESSAGE})")
        end = _LENGTH.size + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[_LENGTH.size : end])
        del self._buffer[:end]
        try:
            message = json.loads(body)
        except ValueError as error:
            raise ChannelError(f"{self.name}: a message that is not JSON: {error}") from None
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise ChannelError(f"{self.name}: a message without an op: {body[:80]!r}")
        count = message.pop("fds", 0)
        if not isinstance(count, int) or not 0 <= count <= len(self._fds):
            raise ChannelError(f"{self.name}: a message says {count!r} descriptors, {len(self._fds)} arrived")
        return message, [self._fds.popleft() for _ in range(count)]

    async def _wait(self, wait: Any) -> None:
        try:
            await wait(self.socket)
        except anyio.ClosedResourceError:
            raise ChannelClosedError(f"{self.name}: the channel is closed") from None

    def close(self) -> None:
        """Close this end (and any descriptors received and not taken); the other side sees the end of stream."""
        if self._closed:
            return
        self._closed = True
        while self._fds:
            with contextlib.suppress(OSError):
                os.close(self._fds.popleft())
        with contextlib.suppress(Exception):
            anyio.notify_closing(self.socket)
        self.socket.close()
