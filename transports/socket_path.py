"""Where a service's UNIX socket lives, and the checks that keep it from being someone else's.

Both ends are checked. A service binds only in a directory no other user
can write (:func:`check_bind_directory`): there, nobody can remove its
socket and put their own in its place. A client talks only to a service
run by itself, by root, or by a user it names (:func:`check_server`, with
the uid the kernel reports for the listening process, SO_PEERCRED): a
socket that another user managed to create at the path is refused before
the client sends anything.

::

    path = default_socket_path()                 # SocketPathError: set XDG_RUNTIME_DIR or pass --socket
    check_bind_directory(path, create=True)      # the service, before binding
    check_server(sock, allowed_server_uids(server_uid), path=path)  # the client, after connecting
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import Collection, Iterable, Mapping
from typing import Final, NamedTuple

from dispatcher import DispatchError

__all__ = [
    "ROOT_SOCKET_DIRECTORY",
    "SOCKET_NAME",
    "PeerCredentials",
    "ServerIdentityError",
    "SocketPathError",
    "UnsafeDirectoryError",
    "allowed_server_uids",
    "check_bind_directory",
    "check_server",
    "default_socket_path",
    "peer_credentials",
]

SOCKET_NAME: Final = "intercept-dispatch.sock"
"""The socket's file name in its default directory."""
ROOT_SOCKET_DIRECTORY: Final = "/run/intercept-dispatch"
"""The default directory of a service run by root (created mode 0755 when it binds)."""

_UCRED = struct.Struct("3i")


class SocketPathError(DispatchError):
    """A socket path that cannot be used; ``str()`` names the path and why."""


class UnsafeDirectoryError(SocketPathError):
    """A directory where another user could replace a socket; ``str()`` names it, its mode and owner, and why."""

    def __init__(self, message: str, *, directory: str, mode: int, owner: int) -> None:
        super().__init__(message)
        self.directory = directory
        self.mode = mode
        self.owner = owner


class ServerIdentityError(DispatchError):
    """The process listening on a socket is run by a user this client does not trust.

    ``uid`` and ``pid`` are the listener's (SO_PEERCRED), ``path`` the socket's.
    """

    def __init__(self, message: str, *, uid: int, pid: int, path: str) -> None:
        super().__init__(message)
        self.uid = uid
        self.pid = pid
        self.path = path


class PeerCredentials(NamedTuple):
    """The peer process as the kernel saw it when the socket connected (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Who is at the other end of a connected UNIX socket: pid, uid and gid from SO_PEERCRED."""
    return PeerCredentials._make(_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)))


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """Where a service listens, and a client connects, unless told otherwise.

    ``$XDG_RUNTIME_DIR/intercept-dispatch.sock`` (a per-user directory only
    its owner can enter); for root without it,
    ``/run/intercept-dispatch/intercept-dispatch.sock``. Anyone else without
    XDG_RUNTIME_DIR gets a :class:`~transports.socket_path.SocketPathError`: a fixed name in a
    directory every user can write (``/tmp``) could be taken first by another
    user.
    """
    runtime = (os.environ if environ is None else environ).get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, SOCKET_NAME)
    if os.geteuid() == 0:
        return os.path.join(ROOT_SOCKET_DIRECTORY, SOCKET_NAME)
    raise SocketPathError(
        "no default socket path: XDG_RUNTIME_DIR is not set; set it (to a directory only you can write) "
        "or pass --socket PATH"
    )


def check_bind_directory(path: str | os.PathLike[str], *, create: bool = False) -> None:
    """Refuse to bind ``path`` in a directory where another user could replace the socket.

    The directory must belong to this user or root, and no other user may
    write it (no group or other write bit), unless it is sticky (as ``/tmp``
    is: nobody but a file's owner may remove it) and whatever is already at
    ``path`` belongs to this user. ``create`` makes a missing directory,
    mode 0755 (its parent must exist). Raises :class:`UnsafeDirectoryError`,
    or :class:`SocketPathError` when the directory cannot be examined.
    """
    where = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(where))
    if create and not os.path.lexists(directory):
        try:
            os.mkdir(directory, 0o755)
            os.chmod(directory, 0o755)  # exactly 0755 whatever the umask: clients of other users must reach it
        except FileExistsError:
            pass  # made meanwhile: examined below like any other
        except OSError as error:
            raise SocketPathError(f"cannot create the directory {directory}: {error.strerror or error}") from None
    try:
        info = os.stat(directory)
    except OSError as error:
        raise SocketPathError(f"cannot use the directory {directory}: {error.strerror or error}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise SocketPathError(f"cannot use {directory} for a socket: it is not a directory")
    me = os.geteuid()
    mode = stat.S_IMODE(info.st_mode)
    described = f"{directory} (mode {mode:04o}, owner uid {info.st_uid})"

    def unsafe(why: str) -> UnsafeDirectoryError:
        return UnsafeDirectoryError(
            f"refusing to listen in {described}: {why}", directory=directory, mode=mode, owner=info.st_uid
        )

    if info.st_uid not in (me, 0):
        raise unsafe(f"it belongs to another user (this one is uid {me}), who could replace the socket")
    if not mode & 0o022:
        return
    if not mode & stat.S_ISVTX:
        raise unsafe(
            "other users may write in it, so they could replace the socket; use a directory only you can write"
        )
    try:
        there = os.lstat(where)
    except FileNotFoundError:
        return
    except OSError as error:
        raise SocketPathError(f"cannot examine {where}: {error.strerror or error}") from None
    if there.st_uid != me:
        raise unsafe(
            f"other users may write in it, and {where} already exists there, owned by uid {there.st_uid} "
            "(not this user)"
        )


def allowed_server_uids(server_uid: int | Iterable[int] | None = None) -> frozenset[int]:
    """The users a client trusts to run the service: itself, root, and ``server_uid`` (one uid or several)."""
    extra = () if server_uid is None else (server_uid,) if isinstance(server_uid, int) else tuple(server_uid)
    return frozenset({os.geteuid(), 0, *extra})


def check_server(
    sock: socket.socket, allowed_uids: Collection[int], *, path: str | os.PathLike[str] | None = None
) -> PeerCredentials:
    """The listening process's credentials, if its uid is in ``allowed_uids``; else :class:`ServerIdentityError`.

    ``path`` names the socket in the error (default: the connected peer's address).
    """
    credentials = peer_credentials(sock)
    if credentials.uid in allowed_uids:
        return credentials
    where = os.fspath(path) if path is not None else str(sock.getpeername() or "an unnamed socket")
    trusted = ", ".join(str(uid) for uid in sorted(allowed_uids))
    raise ServerIdentityError(
        f"the socket {where} is served by uid {credentials.uid} (pid {credentials.pid}), not a user this client "
        f"trusts (uids {trusted}; add one with --server-uid); nothing was sent to it",
        uid=credentials.uid,
        pid=credentials.pid,
        path=where,
    )
