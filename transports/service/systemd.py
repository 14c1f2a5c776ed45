"""The two systemd protocols a service speaks: socket activation and readiness notification.

Both are plain environment variables and datagrams (sd_listen_fds(3),
sd_notify(3)); nothing here needs libsystemd, and both do nothing when
the variables are absent.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["LISTEN_FDS_START", "listen_fds", "notify"]

log = logging.getLogger("intercept_dispatch.service")

LISTEN_FDS_START = 3
"""The first descriptor systemd passes (SD_LISTEN_FDS_START)."""


def listen_fds(*, unset_environment: bool = True) -> list[int]:
    """The listening sockets systemd passed to this process, or ``[]``.

    They count only when LISTEN_PID names this process (a child that
    inherited the variables must not take them). The variables are removed,
    as ``sd_listen_fds(1)`` does, so children never see them.
    """
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager; False if there is none.

    NOTIFY_SOCKET may name a path or, with a leading ``@``, an abstract
    socket. A failure to send is logged, never raised: the service works
    without a manager.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as error:
        log.warning("could not notify the service manager at %s: %s", os.environ["NOTIFY_SOCKET"], error)
        return False
    return True
