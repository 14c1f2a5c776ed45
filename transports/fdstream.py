"""A :class:`~dispatcher.Transport` over non-blocking file descriptors carrying a byte stream.

The UNIX socket and pipe transports share it. A read takes everything the
kernel holds (one system call for a whole batch); a write sends a batch as
one buffer (one system call in the usual case). Waiting uses anyio's
``wait_readable``/``wait_writable``, so the same code runs on asyncio and
trio, and a read or write that can proceed at once costs no event-loop turn.

Inline (:meth:`FdStreamTransport.start_inline`, which a
:class:`~dispatcher.Dispatcher` uses): one blocking reader thread per
connection polls the read descriptor, splits frames, hands each batch to
the dispatcher's answer function and writes the completions it returns,
all on that thread, so a synchronous handler's round trip never touches
the event loop. Writes from the thread and from the loop
(:meth:`~FdStreamTransport.send_batch`, for async handlers' completions)
share one lock, so frames never interleave.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence

import anyio
import anyio.from_thread
import anyio.lowlevel

from dispatcher import Transport, TransportClosedError, TransportError
from dispatcher.device_lock import Acquire
from dispatcher.transport import InlineAnswer
from dispatcher.wire import frame_ids

from .framing import FrameSplitter
from .latency import LatencySamples

__all__ = ["CLOSE_GRACE", "READ_SIZE", "FdStreamTransport"]

log = logging.getLogger("intercept_dispatch.transports")

READ_SIZE = 1 << 16
"""The most one read takes: 455 intercept frames."""
CLOSE_GRACE = 1.0
"""Seconds :meth:`FdStreamTransport.aclose` waits for the inline reader thread to end."""

_MAX_STARTED = 4096
_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN})
# How long the reader thread waits for a full socket buffer to drain before
# looking again whether the transport was closed meanwhile.
_WRITE_POLL_MS = 50


class FdStreamTransport(Transport):
    """Frames over a read descriptor and a write descriptor (the same one for a socket).

    The descriptors must be non-blocking; the transport closes them in
    :meth:`aclose`. ``name`` identifies the connection in logs and errors.

    A header that cannot be delimited ends the connection: the frames before
    it are delivered, then :meth:`receive_batch` raises
    :class:`~dispatcher.TransportError`. :meth:`stop_reading` is the
    graceful half-close a service uses when it stops.

    It answers inline (:meth:`start_inline`): then one reader thread per
    connection reads, calls the answer function and writes its completions;
    :meth:`receive_batch` only waits for that thread to end.
    """

    stops_reading = True
    answers_inline = True

    def __init__(self, read_fd: int, write_fd: int, *, name: str) -> None:
        self.name = name
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._splitter = FrameSplitter()
        # Two locks, always taken in this order: the loop's tasks queue on the
        # first (waiting without blocking the loop), then take the second,
        # which the inline reader thread holds only while it writes.
        self._loop_writer = anyio.Lock(fast_acquire=True)
        self._write_lock = threading.Lock()
        self._closed = False
        self._eof = False
        self._stopping = False
        self._readable = False
        self.latency: LatencySamples | None = None
        """Where to record latency samples (see :mod:`transports.latency`); None records nothing."""
        self._started: dict[tuple[int, int], float] = {}
        # Inline mode: the reader thread, how it wakes, and who closes the descriptors.
        self._thread: threading.Thread | None = None
        self._thread_done = False
        self._state_lock = threading.Lock()
        self._wake: tuple[int, int] | None = None
        self._ended: anyio.Event | None = None
        self._inline_error: TransportError | None = None

    # The system calls, which the socket transport replaces.

    def _read(self) -> bytes:
        return os.read(self._read_fd, READ_SIZE)

    def _write(self, data: bytes | memoryview) -> int:
        return os.write(self._write_fd, data)

    def _close_fds(self) -> None:
        os.close(self._read_fd)
        if self._write_fd != self._read_fd:
            os.close(self._write_fd)

    async def receive_batch(self) -> list[bytes]:
        """Wait for at least one whole frame; return every whole frame the kernel holds.

        Returns ``[]`` at end of stream, after :meth:`stop_reading` has
        drained what was already readable, or once closed. Inline, it
        returns ``[]`` (or raises the reader thread's error) once that
        thread has ended.
        """
        if self._ended is not None:
            await self._ended.wait()
            error, self._inline_error = self._inline_error, None
            if error is not None:
                raise error
            return []
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
            self._wake_thread()

    def _interrupt_read(self) -> None:
        # Wakes a waiting read without closing anything; the read and write
        # descriptors differ here, so a waiting write is not disturbed.
        anyio.notify_closing(self._read_fd)

    async def send_batch(self, frames: Sequence[bytes]) -> None:
        """Send frames in order as one write. A write, once begun, is finished even if cancelled.

        Safe to call while the inline reader thread writes: the two take turns.
        """
        if not frames:
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        view = memoryview(data)
        if self._loop_writer.locked() or not self._write_lock.acquire(blocking=False):
            async with self._loop_writer:
                await self._locked_write(data, view)
        else:
            # Nothing is writing: most often the whole write completes at once.
            try:
                view = view[self._write_some(view) :]
                if view:
                    # The lock is free and taking it does not yield: nothing slips in.
                    async with self._loop_writer:
                        await self._write_all(view, begun=len(view) < len(data))
            finally:
                self._write_lock.release()
        if self._started and self.latency is not None:
            started = self._started.pop(frame_ids(frames[0]), None)
            if started is not None:
                self.latency.samples.append(time.perf_counter() - started)

    async def _locked_write(self, data: bytes, view: memoryview) -> None:
        # Holding the loop's writer lock: take the thread lock too (its holder is quick), then write.
        lock = self._write_lock
        if not lock.acquire(blocking=False):
            await Acquire(lock, anyio.lowlevel.checkpoint)
        try:
            view = view[self._write_some(view) :]
            if view:
                await self._write_all(view, begun=len(view) < len(data))
        finally:
            lock.release()

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
        """Close the descriptors, waking any task waiting on them. Closing twice is harmless.

        Inline, the reader thread is woken and waited for, at most
        :data:`CLOSE_GRACE` seconds (a handler it runs may never return):
        a thread still running then closes the descriptors itself when it
        comes back.
        """
        if self._closed:
            return
        for fd in {self._read_fd, self._write_fd}:
            anyio.notify_closing(fd)
        with self._state_lock:
            self._closed = True
            thread_owns = self._thread is not None and not self._thread_done
        if not thread_owns:
            self._close_all()
            await anyio.lowlevel.checkpoint()
            return
        self._hang_up()
        self._wake_thread()
        if self._ended is not None:
            with anyio.move_on_after(CLOSE_GRACE):
                await self._ended.wait()
        await anyio.lowlevel.checkpoint()

    def _close_all(self) -> None:
        # Under the write lock: a write from the loop never meets a closed (or reused) descriptor.
        with self._write_lock:
            self._close_fds()
            if self._wake is not None:
                for fd in self._wake:
                    os.close(fd)
                self._wake = None

    def _hang_up(self) -> None:
        """Tell the peer at once that this end is closing (a socket shuts down; a pipe cannot)."""

    # Inline: the reader thread.

    def start_inline(self, answer: InlineAnswer) -> None:
        """Read and answer on a thread of this connection's own (see the module's documentation).

        Call once, from the event loop, before the first :meth:`receive_batch`.
        """
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: already answering inline")
        if self._closed:
            raise TransportClosedError(f"{self.name}: the transport is closed")
        self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ended = anyio.Event()
        token = anyio.lowlevel.current_token()
        self._thread = threading.Thread(
            target=self._read_inline, args=(answer, token), name=f"inline reader: {self.name}", daemon=True
        )
        self._thread.start()

    def _wake_thread(self) -> None:
        wake = self._wake
        if wake is not None:
            with contextlib.suppress(OSError):
                os.write(wake[1], b"!")

    def _read_inline(self, answer: InlineAnswer, token: anyio.lowlevel.EventLoopToken) -> None:
        error: TransportError | None = None
        try:
            self._reader_loop(answer)
        except TransportError as failure:
            error = failure
        except BaseException as failure:
            log.exception("%s: the inline reader failed", self.name)
            error = TransportError(f"{self.name}: the inline reader failed: {failure!r}")
        finally:
            if error is not None and not self._closed:
                self._inline_error = error
            with self._state_lock:
                self._thread_done = True
                close_now = self._closed
            if close_now:
                self._close_all()
            ended = self._ended
            if ended is not None:
                with contextlib.suppress(Exception):
                    anyio.from_thread.run_sync(ended.set, token=token)

    def _blocking_reader(self) -> Callable[[], bytes] | None:
        """A read that blocks until data, end of stream or a wake-up; None where this descriptor has none.

        A socket has one (shutting it down wakes the read); a pipe has not,
        so its reader thread polls the descriptor and a wake-up pipe instead.
        """
        return None

    def _polling_reader(self) -> Callable[[], bytes]:
        # Poll the descriptor and the wake-up pipe, then read without blocking.
        assert self._wake is not None
        poller = select.poll()
        poller.register(self._read_fd, select.POLLIN)
        poller.register(self._wake[0], select.POLLIN)

        def read() -> bytes:
            while not self._closed:
                if not self._readable and not self._stopping:
                    poller.poll()
                    if self._closed:
                        break
                try:
                    data = self._read()
                except BlockingIOError:
                    self._readable = False
                    if self._stopping:
                        break
                    continue
                self._readable = len(data) == READ_SIZE
                return data
            return b""

        return read

    def _reader_loop(self, answer: InlineAnswer) -> None:
        read = self._blocking_reader() or self._polling_reader()
        splitter = self._splitter
        feed = splitter.feed
        send = self._send_blocking
        perf_counter = time.perf_counter
        while True:
            try:
                data = read()
            except OSError as error:
                if self._closed:
                    return
                raise self._failure("read", error) from error
            if not data:
                if splitter.pending and not self._closed:
                    log.warning(
                        "%s: the peer closed in the middle of a frame; %d bytes discarded", self.name, splitter.pending
                    )
                return
            frames = feed(data)
            if frames:
                latency = self.latency
                if latency is None:
                    out = answer(frames)
                    if out:
                        send(out)
                else:
                    started = perf_counter()
                    out = answer(frames)
                    if out:
                        send(out)
                        latency.samples.append(perf_counter() - started)  # one sample per batch answered
            broken = splitter.error
            if broken is not None:
                raise TransportError(f"{self.name}: {broken}") from broken

    def _send_blocking(self, frames: Sequence[bytes]) -> None:
        # The reader thread's write: all of it, waiting for room as needed.
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        with self._write_lock:
            if self._closed:
                raise TransportClosedError(f"{self.name}: the transport is closed")
            try:
                sent = self._write(data)
            except BlockingIOError:
                sent = 0
            except OSError as error:
                raise self._failure("write", error) from error
            if sent == len(data):
                return
            view = memoryview(data)[sent:]
            while True:
                view = view[self._write_some(view) :]
                if not view:
                    return
                writable = select.poll()
                writable.register(self._write_fd, select.POLLOUT)
                writable.poll(_WRITE_POLL_MS)
