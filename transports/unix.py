"""Frames over a UNIX stream socket: the listener a service binds and the connection both sides use.

SOCK_STREAM, not SOCK_SEQPACKET: one read takes every frame queued (a
record socket needs a system call per frame), the same framing serves the
pipe transport, and SCM_RIGHTS works on both. docs/PROTOCOL.md gives the
full reasoning.

Descriptors (guest memory as memfds, for string I/O) travel as SCM_RIGHTS
ancillary data: :meth:`UnixTransport.send_fds` attaches them to one frame,
and the receiver keeps every descriptor that arrives in a FIFO queue, in
stream order, from which the handler of that frame takes them with
:meth:`UnixTransport.take_fds`.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import Callable, Sequence

import anyio
import anyio.lowlevel

from dispatcher import TransportClosedError, TransportError
from dispatcher.device_lock import Acquire
from dispatcher.transport import InlineAnswer

from .fdstream import READ_SIZE, FdStreamTransport
from .socket_path import PeerCredentials, default_socket_path, peer_credentials

__all__ = [
    "DEFAULT_MODE",
    "PeerCredentials",
    "UnixListener",
    "UnixTransport",
    "connect_unix",
    "default_socket_path",
    "fds_ancillary",
    "received_fds",
]

log = logging.getLogger("intercept_dispatch.transports")

DEFAULT_MODE = 0o600
"""Permissions of a socket :meth:`UnixListener.bind` creates unless told otherwise: its owner's only."""
MAX_FDS_PER_READ = 16
"""Descriptors one read can carry; more arriving at once is a protocol error."""
MAX_QUEUED_FDS = 64
"""Descriptors received and not yet taken; more is a protocol error."""

_FD = array.array("i").itemsize


def fds_ancillary(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that passes ``fds`` with ``sendmsg`` (SCM_RIGHTS); none for no descriptors."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors a ``recvmsg`` delivered (SCM_RIGHTS), in order; the caller owns them."""
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % _FD])
    return fds.tolist()


class UnixTransport(FdStreamTransport):
    """One connected UNIX stream socket carrying frames, and descriptors beside them."""

    def __init__(self, sock: socket.socket, *, name: str | None = None) -> None:
        sock.setblocking(False)
        fd = sock.fileno()
        super().__init__(fd, fd, name=name or f"unix socket fd {fd}")
        self.socket = sock
        self._fds: deque[int] = deque()
        self._ancillary_size = socket.CMSG_SPACE(MAX_FDS_PER_READ * _FD)

    def peer_credentials(self) -> PeerCredentials:
        """Who is at the other end: pid, uid and gid from SO_PEERCRED."""
        return peer_credentials(self.socket)

    def _read(self) -> bytes:
        data, ancillary, flags, _ = self.socket.recvmsg(READ_SIZE, self._ancillary_size, socket.MSG_DONTWAIT)
        if ancillary:
            self._keep_fds(ancillary, flags)
        return data

    def _keep_fds(self, ancillary: list[tuple[int, int, bytes]], flags: int) -> None:
        # Descriptors queue in stream order, for take_fds.
        self._fds.extend(received_fds(ancillary))
        if flags & socket.MSG_CTRUNC:
            raise TransportError(f"{self.name}: more than {MAX_FDS_PER_READ} descriptors arrived at once")
        if len(self._fds) > MAX_QUEUED_FDS:
            raise TransportError(f"{self.name}: {len(self._fds)} descriptors received and not taken")

    def _write(self, data: bytes | memoryview) -> int:
        # MSG_DONTWAIT: inline, the socket itself is blocking (for the reader thread).
        return self.socket.send(data, socket.MSG_DONTWAIT)

    def _blocking_reader(self) -> Callable[[], bytes]:
        recvmsg, size, ancillary_size, keep_fds = self.socket.recvmsg, READ_SIZE, self._ancillary_size, self._keep_fds

        def read() -> bytes:
            data, ancillary, flags, _ = recvmsg(size, ancillary_size)
            if ancillary:
                keep_fds(ancillary, flags)
            return data

        return read

    def start_inline(self, answer: InlineAnswer) -> None:
        """Answer on a reader thread of this connection (see :meth:`.FdStreamTransport.start_inline`).

        The socket is switched to blocking mode, so that thread waits in the
        read itself; every other read and write passes MSG_DONTWAIT.
        """
        if not self._closed and self._thread is None:
            self.socket.setblocking(True)
        super().start_inline(answer)

    def _interrupt_read(self) -> None:
        # The kernel does the rest: data already queued is still read, then end
        # of stream; the peer's later writes fail with EPIPE, so it learns at once.
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RD)

    def _hang_up(self) -> None:
        # Wakes the inline reader thread's poll, and the peer learns at once.
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)

    def _close_fds(self) -> None:
        while self._fds:
            os.close(self._fds.popleft())
        self.socket.close()

    @property
    def queued_fds(self) -> int:
        """Descriptors received and not yet taken."""
        return len(self._fds)

    def take_fds(self, count: int) -> list[int]:
        """Take the oldest ``count`` received descriptors; the caller owns (and closes) them.

        A frame sent with :meth:`send_fds` has its descriptors queued by the
        time the frame itself is delivered. Raises
        :class:`~dispatcher.TransportError` if fewer have arrived.
        """
        if count > len(self._fds):
            raise TransportError(f"{self.name}: {count} descriptors wanted, {len(self._fds)} received")
        return [self._fds.popleft() for _ in range(count)]

    async def send_fds(self, frame: bytes, fds: Sequence[int]) -> None:
        """Send one frame with descriptors attached (SCM_RIGHTS), in order with the other frames.

        The descriptors are duplicated into the peer; the caller keeps its own.
        """
        if not frame or not 1 <= len(fds) <= MAX_FDS_PER_READ:
            raise ValueError(f"send_fds needs a frame and 1..{MAX_FDS_PER_READ} descriptors")
        ancillary = fds_ancillary(fds)
        async with self._loop_writer:
            lock = self._write_lock
            if not lock.acquire(blocking=False):
                await Acquire(lock, anyio.lowlevel.checkpoint)
            try:
                while True:
                    if self._closed:
                        raise TransportClosedError(f"{self.name}: the transport is closed")
                    try:
                        sent = self.socket.sendmsg([frame], ancillary, socket.MSG_DONTWAIT)
                        break
                    except BlockingIOError:
                        try:
                            await anyio.wait_writable(self._write_fd)
                        except anyio.ClosedResourceError:
                            raise TransportClosedError(f"{self.name}: closed while writing") from None
                    except OSError as error:
                        raise self._failure("write", error) from error
                await self._write_all(memoryview(frame)[sent:], begun=True)
            finally:
                lock.release()


async def connect_unix(path: str | os.PathLike[str], *, name: str | None = None) -> UnixTransport:
    """Connect to a service's socket. Raises ``OSError`` (e.g. ``FileNotFoundError``,
    ``ConnectionRefusedError``) when nothing listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        while True:
            try:
                sock.connect(os.fspath(path))
                break
            except BlockingIOError:
                await anyio.wait_writable(sock)  # the listener's backlog is full: retry when it drains
    except BaseException:
        sock.close()
        raise
    return UnixTransport(sock, name=name or f"unix socket {os.fspath(path)}")


class UnixListener:
    """A listening UNIX stream socket; :meth:`accept` yields :class:`UnixTransport` connections.

    Made by :meth:`bind` (a socket file this listener owns and removes when
    closed) or :meth:`from_fd` (an inherited socket, e.g. from systemd).
    """

    def __init__(self, sock: socket.socket, *, path: str | None = None, owns_path: bool = False) -> None:
        sock.setblocking(False)
        self.socket = sock
        self.path = path
        self._identity: tuple[int, int] | None = None
        if owns_path and path is not None:
            info = os.stat(path)
            self._identity = (info.st_dev, info.st_ino)
        self._closed = False

    @classmethod
    def bind(cls, path: str | os.PathLike[str], *, mode: int = DEFAULT_MODE, backlog: int = 128) -> UnixListener:
        """Bind and listen at ``path`` with permissions ``mode``.

        A socket file left by a dead service (nothing accepts on it) is
        replaced; a live one is not: ``OSError(EADDRINUSE)``. A path that is
        not a socket is never touched: ``FileExistsError``.
        """
        if not 0 <= mode <= 0o777:
            raise ValueError(f"mode must be within 0o000..0o777, not {mode:#o}")
        where = os.fspath(path)
        _remove_stale(where)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The socket file is created with these permissions, never looser
            # for a moment (a chmod after bind would leave a window).
            umask = os.umask(0o777 & ~mode)
            try:
                sock.bind(where)
            finally:
                os.umask(umask)
            sock.listen(backlog)
            return cls(sock, path=where, owns_path=True)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def from_fd(cls, fd: int) -> UnixListener:
        """Adopt an inherited listening socket. Raises ``ValueError`` if it is not a UNIX stream socket."""
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise ValueError(f"descriptor {fd} is not a UNIX stream socket")
        name = sock.getsockname()
        return cls(sock, path=name if isinstance(name, str) and name else None)

    async def accept(self) -> UnixTransport:
        """Wait for the next connection. Raises ``anyio.ClosedResourceError`` once closed."""
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                sock, _ = self.socket.accept()
            except BlockingIOError:
                await anyio.wait_readable(self.socket)
                continue
            except (ConnectionAbortedError, InterruptedError):
                continue
            return UnixTransport(sock)

    async def aclose(self) -> None:
        """Stop listening; remove the socket file if this listener made it and it is still there."""
        if self._closed:
            return
        self._closed = True
        anyio.notify_closing(self.socket)
        self.socket.close()
        if self._identity is not None and self.path is not None:
            try:
                info = os.stat(self.path)
                if (info.st_dev, info.st_ino) == self._identity:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        await anyio.lowlevel.checkpoint()


def _remove_stale(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket; not replacing it", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        log.info("replaced the stale socket %s (nothing was listening)", path)
        return
    except TimeoutError:
        raise OSError(errno.EADDRINUSE, "a service is listening there (its backlog is full)", path) from None
    except OSError as error:
        raise OSError(error.errno, f"cannot tell whether a service listens there: {error.strerror}", path) from None
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another service is listening there", path)
