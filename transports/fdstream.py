"""A :class:`~dispatcher.Transport` over non-blocking file descriptors carrying a byte stream.

The UNIX socket and pipe transports share it. A read takes everything the
kernel holds (one system call for a whole batch); a write sends a batch as
one buffer (one system call in the usual case). Waiting uses anyio's
``wait_readable``/``wait_writable``, so the same code runs on asyncio and
trio, and a read or write that can proceed at once costs no event-loop turn.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Sequence

import anyio
import anyio.lowlevel

from dispatcher import Transport, TransportClosedError, TransportError

from .framing import FrameSplitter

__all__ = ["READ_SIZE", "FdStreamTransport"]

log = logging.getLogger("transports")

READ_SIZE = 1 << 16
"""The most one read takes: 455 intercept frames."""

_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN})


class FdStreamTransport(Transport):
    """Frames over a read descriptor and a write descriptor (the same one for a socket).

    The descriptors must be non-blocking; the transport closes them in
    :meth:`aclose`. ``name`` identifies the connection in logs and errors.

    A header that cannot be delimited ends the connection: the frames before
    it are delivered, then :meth:`receive_batch` raises
    :class:`~dispatcher.TransportError`. :meth:`stop_reading` is the
    graceful half-close a service uses when it stops.
    """

    def __init__(self, read_fd: int, write_fd: int, *, name: str) -> None:
        self.name = name
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._splitter = FrameSplitter()
        self._write_lock = anyio.Lock(fast_acquire=True)
        self._closed = False
        self._eof = False
        self._stopping = False
        self._readable = False
        self._wait_scope: anyio.CancelScope | None = None

    # The system calls, which the socket transport replaces.

    def _read(self) -> bytes:
        return os.read(self._read_fd, READ_SIZE)

    def _write(self, data: memoryview) -> int:
        return os.write(self._write_fd, data)

    def _close_fds(self) -> None:
        os.close(self._read_fd)
        if self._write_fd != self._read_fd:
            os.close(self._write_fd)

    @property
    def closed(self) -> bool:
        return self._closed

    async def receive_batch(self) -> list[bytes]:
        """Wait for at least one whole frame; return every whole frame the kernel holds.

        Returns ``[]`` at end of stream, after :meth:`stop_reading` has
        drained what was already readable, or once closed.
        """
        while True:
            broken = self._splitter.error
            if broken is not None:
                raise TransportError(f"{self.name}: {broken}") from broken
            if self._eof or self._closed:
                return []
            # Wait first: after a read that emptied the buffer, trying another
            # read would nearly always cost a failed system call.
            if not self._readable and not self._stopping:
                await self._wait_readable()
                if self._closed:
                    return []
            try:
                data = self._read()
            except BlockingIOError:
                self._readable = False
                if self._stopping:
                    self._eof = True
                    return []
                continue
            except OSError as error:
                if self._closed:
                    return []
                raise self._failure("read", error) from error
            if not data:
                self._eof = True
                if self._splitter.pending:
                    log.warning(
                        "%s: the peer closed in the middle of a frame; %d bytes discarded",
                        self.name,
                        self._splitter.pending,
                    )
                return []
            # A full read may have left more behind: read again without waiting.
            self._readable = len(data) == READ_SIZE
            frames = self._splitter.feed(data)
            if frames:
                if self._readable:
                    # The next call will not wait, so yield here: a busy connection
                    # must not starve the others. Shielded: what was read is kept.
                    await anyio.lowlevel.cancel_shielded_checkpoint()
                return frames

    async def _wait_readable(self) -> None:
        # ClosedResourceError: aclose() ran, which the caller sees in self._closed.
        with anyio.CancelScope() as self._wait_scope, contextlib.suppress(anyio.ClosedResourceError):
            await anyio.wait_readable(self._read_fd)
        self._wait_scope = None

    def stop_reading(self) -> None:
        """Read only what has already arrived, then report end of stream.

        The frames the peer had sent before this call are still delivered;
        what it sends later is not read. Sending is unaffected, so the
        completions of those frames still go out.
        """
        self._stopping = True
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    async def send_batch(self, frames: Sequence[bytes]) -> None:
        """Send frames in order as one write. A write, once begun, is finished even if cancelled."""
        if not frames:
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        async with self._write_lock:
            await self._write_all(data)

    async def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while True:
            if self._closed:
                raise TransportClosedError(f"{self.name}: the transport is closed")
            try:
                view = view[self._write(view) :]
            except BlockingIOError:
                pass
            except OSError as error:
                raise self._failure("write", error) from error
            if not view:
                return
            # Part of a frame is out: the rest must follow, or the stream is broken.
            # Cancellation is therefore held off once the first byte is written.
            with anyio.CancelScope(shield=len(view) < len(data)):
                try:
                    await anyio.wait_writable(self._write_fd)
                except anyio.ClosedResourceError:
                    raise TransportClosedError(f"{self.name}: closed while writing") from None

    def _failure(self, what: str, error: OSError) -> TransportError:
        if error.errno in _GONE:
            return TransportClosedError(f"{self.name}: the peer has gone ({what}: {error.strerror})")
        return TransportError(f"{self.name}: {what} failed: {error}")

    async def aclose(self) -> None:
        """Close the descriptors, waking any task waiting on them. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        for fd in {self._read_fd, self._write_fd}:
            anyio.notify_closing(fd)
        self._close_fds()
        await anyio.lowlevel.checkpoint()
