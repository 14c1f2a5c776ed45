"""Frames over a pair of pipes: a child process's stdin and stdout, or two named FIFOs.

The descriptors are switched to non-blocking mode while the transport owns
them and switched back before they are closed: O_NONBLOCK belongs to the
open file, which another process holding the same pipe may share.
"""

from __future__ import annotations

import contextlib
import os

import anyio
import anyio.to_thread

from .fdstream import FdStreamTransport

__all__ = ["PipeTransport", "open_fifos", "stdio_transport"]


class PipeTransport(FdStreamTransport):
    """Frames in from ``read_fd`` and out to ``write_fd``; the transport owns and closes both."""

    def __init__(self, read_fd: int, write_fd: int, *, name: str = "pipe") -> None:
        self._blocking = {fd: os.get_blocking(fd) for fd in (read_fd, write_fd)}
        for fd in self._blocking:
            os.set_blocking(fd, False)
        super().__init__(read_fd, write_fd, name=name)

    def _close_fds(self) -> None:
        for fd, blocking in self._blocking.items():
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)
            os.close(fd)


def stdio_transport() -> PipeTransport:
    """This process's stdin and stdout as a transport, for a service a VMM runs as its child.

    The protocol moves to private copies of descriptors 0 and 1; descriptor
    1 then points at stderr and 0 at /dev/null, so a stray ``print`` cannot
    corrupt the stream.
    """
    read_fd, write_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return PipeTransport(read_fd, write_fd, name="stdio")


async def open_fifos(read_path: str, write_path: str) -> PipeTransport:
    """Open two named FIFOs; returns once the peer has opened their other ends.

    Both opens wait in worker threads at the same time, so the two sides may
    open the pair in either order. (A read end opened early without a
    writer would report end of stream at once.)
    """
    fds: dict[str, int] = {}

    async def open_end(path: str, flags: int) -> None:
        fds[path] = await anyio.to_thread.run_sync(os.open, path, flags, abandon_on_cancel=True)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(open_end, read_path, os.O_RDONLY)
            tg.start_soon(open_end, write_path, os.O_WRONLY)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return PipeTransport(fds[read_path], fds[write_path], name=f"fifos {read_path}, {write_path}")
