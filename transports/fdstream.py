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
import time
from collections.abc import Sequence

import anyio
import anyio.lowlevel

from dispatcher import Transport, TransportClosedError, TransportError
from dispatcher.wire import frame_ids

from .framing import FrameSplitter
from .latency import LatencySamples

__all__ = ["READ_SIZE", "FdStreamTransport"]

log = logging.getLogger("intercept_dispatch.transports")

READ_SIZE = 1 << 16
"""The most one read takes: 455 intercept frames."""

_MAX_STARTED = 4096
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

    stops_reading = True

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
        self.latency: LatencySamples | None = None
        """Where to record latency samples (see :mod:`transports.latency`); None records nothing."""
        self._started: dict[tuple[int, int], float] = {}

    # The system calls, which the socket transport replaces.

    def _read(self) -> bytes:
        return os.read(self._read_fd, READ_SIZE)

    def _write(self, data: memoryview) -> int:
        return os.write(self._write_fd, data)

    def _close_fds(self) -> None:
        os.close(self._read_fd)
        if self._write_fd != self._read_fd:
            os.close(self._write_fd)

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
                if self.latency is not None and len(self._started) < _MAX_STARTED:
                    # One sample per batch, keyed by its first frame's partition
                    # and VP (where a completion has them too).
                    self._started[frame_ids(frames[0])] = time.perf_counter()
                if self._readable:
                    # The next call will not wait, so yield here: a busy connection
                    # must not starve the others. Shielded: what was read is kept.
                    await anyio.lowlevel.cancel_shielded_checkpoint()
                return frames

    async def _wait_readable(self) -> None:
        # ClosedResourceError: aclose() ran (the caller sees self._closed), or
        # stop_reading() woke the wait (the caller sees self._stopping).
        with contextlib.suppress(anyio.ClosedResourceError):
            await anyio.wait_readable(self._read_fd)

    def stop_reading(self) -> None:
        """Read only what has already arrived, then report end of stream.

        The frames the peer had sent before this call are still delivered;
        what it sends later is not read. Sending is unaffected, so the
        completions of those frames still go out.
        """
        if not self._stopping and not self._closed:
            self._stopping = True
            self._interrupt_read()

    def _interrupt_read(self) -> None:
        # Wakes a waiting read without closing anything; the read and write
        # descriptors differ here, so a waiting write is not disturbed.
        anyio.notify_closing(self._read_fd)

    async def send_batch(self, frames: Sequence[bytes]) -> None:
        """Send frames in order as one write. A write, once begun, is finished even if cancelled."""
        if not frames:
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        view = memoryview(data)
        if not self._write_lock.locked():
            # No write is part-way through, and this one most often completes
            # at once: it needs no lock, since it does not yield.
            view = view[self._write_some(view) :]
        if view:
            # Taking a free lock does not yield either, so nothing slips in between.
            async with self._write_lock:
                await self._write_all(view, begun=len(view) < len(data))
        if self._started and self.latency is not None:
            started = self._started.pop(frame_ids(frames[0]), None)
            if started is not None:
                self.latency.samples.append(time.perf_counter() - started)

    def _write_some(self, view: memoryview) -> int:
        if self._closed:
            raise TransportClosedError(f"{self.name}: the transport is closed")
        try:
            return self._write(view)
        except BlockingIOError:
            return 0
        except OSError as error:
            raise self._failure("write", error) from error

    async def _write_all(self, view: memoryview, *, begun: bool) -> None:
        """Write all of ``view``, waiting as needed; ``begun`` if part of its frame is already out."""
        while view:
            sent = self._write_some(view)
            view = view[sent:]
            begun = begun or sent > 0
            if view:
                # Part of a frame is out: the rest must follow, or the stream is
                # broken. Cancellation is therefore held off once a byte is written.
                with anyio.CancelScope(shield=begun):
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
