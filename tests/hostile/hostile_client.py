"""A blocking client that speaks the service's frames byte by byte, and what the hostile tests measure.

The attacks are written against the protocol, not against the project's
own client, so that a client bug cannot hide a service bug: each attacker
is a plain blocking UNIX socket, as a VMM written in C would have. Every
read has a timeout; every loop a bound.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar, cast

from hostile_devices import PER_VP

from dispatcher import (
    COMPLETION,
    AccessInfo,
    AccessType,
    Completion,
    ExecutionState,
    IoPortInterceptMessage,
    SegmentAttributes,
    SegmentRegister,
    Status,
    decode_announcement,
    decode_completion,
    encode_io_instruction,
)
from dispatcher.hello import Capability, Hello, HelloReply, HelloStatus, decode_hello_reply, encode_hello
from dispatcher.wire import ANNOUNCEMENT, HEADER_SIZE, HELLO_REPLY, MAX_PAYLOAD, message_type

T = TypeVar("T")

TIMEOUT = 30.0  # generous: "answered at all", never "answered quickly"
"""How long any one read waits before the test fails."""


class Refused(Exception):
    """The service answered the opening with another status than ACCEPTED."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"status {status}: {reason}")
        self.status = status
        self.reason = reason


class Closed(Exception):
    """The service closed the connection."""


def hello_frame(vm: int, *, capabilities: Capability = Capability.GUEST_MEMORY) -> bytes:
    """The opening frame of a VMM connection for VM ``vm`` (this version)."""
    return encode_hello(Hello(vm, capabilities=capabilities))


def intercept(port: int, *, vm: int, vp: int = 0, write: bool = False, value: int = 0, size: int = 1) -> bytes:
    """A plain IN or OUT from ``vp`` of VM ``vm``."""
    return IoPortInterceptMessage(
        port_number=port,
        access_type=AccessType.WRITE if write else AccessType.READ,
        access_info=AccessInfo.build(size),
        rax=value,
        vp_index=vp,
        source_partition=vm,
        instruction_length=1,
        rip=0x1000,
    ).to_bytes()


_FLAT = SegmentRegister(0, 0xFFFF_FFFF, 0x10, SegmentAttributes(0xC093))
_CODE32 = SegmentRegister(0, 0xFFFF_FFFF, 0x08, SegmentAttributes(0xC09B))


def rep_outsb(port: int, *, vm: int, vp: int = 0, address: int, count: int) -> bytes:
    """REP OUTSB in 32-bit protected mode, flat DS: ``count`` bytes from guest-physical ``address``."""
    code = encode_io_instruction(write=True, size=1, bits=32, string=True, rep=True, address_size=32)
    return IoPortInterceptMessage(
        port_number=port,
        access_type=AccessType.WRITE,
        access_info=AccessInfo.build(1, string_op=True, rep_prefix=True),
        instruction_length=len(code),
        instruction_bytes=code,
        execution_state=ExecutionState.build(cr0_pe=True),
        cs_segment=_CODE32,
        ds_segment=_FLAT,
        es_segment=_FLAT,
        rip=0x1000,
        rcx=count,
        rsi=address,
        vp_index=vp,
        source_partition=vm,
    ).to_bytes()


class VmClient:
    """One VMM connection: HELLO for VM ``vm``, the reply, the port announcement, then frames.

    Raises :class:`Refused` if the service answers the HELLO with another status than ACCEPTED.
    """

    def __init__(
        self,
        to: str | os.PathLike[str] | socket.socket,
        vm: int,
        *,
        capabilities: Capability = Capability.GUEST_MEMORY,
    ) -> None:
        """Connect to the socket path ``to`` (or use ``to``, a socket connected already) and open VM ``vm``."""
        self.vm = vm
        self.sock = to if isinstance(to, socket.socket) else socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self._buffer = bytearray()
        try:
            if not isinstance(to, socket.socket):
                self.sock.connect(os.fspath(to))
            self.sock.sendall(hello_frame(vm, capabilities=capabilities))
            reply = decode_hello_reply(self.read_frame())
            if reply.status != HelloStatus.ACCEPTED:
                raise Refused(reply.status, reply.reason)
            while True:
                frame = self.read_frame()
                if message_type(frame) != ANNOUNCEMENT:
                    raise AssertionError(
                        f"expected the port announcement, got a frame of type {message_type(frame):#x}"
                    )
                if decode_announcement(frame)[1]:
                    break
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> VmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, frames: Iterable[bytes]) -> None:
        self.sock.sendall(b"".join(frames))

    def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            data = self.sock.recv(1 << 16)
            if not data:
                raise Closed(f"VM {self.vm}: the service closed the connection ({len(self._buffer)} bytes pending)")
            self._buffer += data

    def read_frame(self) -> bytes:
        self._fill(HEADER_SIZE)
        payload = self._buffer[4]
        assert payload <= MAX_PAYLOAD, (
            f"VM {self.vm}: a frame header the service wrote is garbage: {self._buffer[:16]!r}"
        )
        self._fill(HEADER_SIZE + payload)
        frame = bytes(self._buffer[: HEADER_SIZE + payload])
        del self._buffer[: HEADER_SIZE + payload]
        return frame

    def completions(self, count: int) -> list[Completion]:
        """The next ``count`` frames, each of which must be a completion (anything else is garbage)."""
        got = []
        for _ in range(count):
            frame = self.read_frame()
            assert message_type(frame) == COMPLETION, f"VM {self.vm}: a frame of type {message_type(frame):#x}"
            got.append(decode_completion(frame))
        return got

    def exchange(self, frame: bytes) -> Completion:
        self.send([frame])
        (completion,) = self.completions(1)
        return completion

    def read_until_closed(self, limit: int = 1 << 20) -> list[bytes]:
        """Every frame until the service closes the connection (at most ``limit`` frames)."""
        frames = []
        for _ in range(limit):
            try:
                frames.append(self.read_frame())
            except (Closed, ConnectionResetError):
                return frames
        raise AssertionError(f"VM {self.vm}: more than {limit} frames and still open")


def open_raw(path: str | os.PathLike[str]) -> socket.socket:
    """A connected socket that has sent nothing."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(os.fspath(path))
    return sock


def read_hello_reply(sock: socket.socket) -> HelloReply:
    """The HELLO_REPLY a raw socket receives (after it sent a HELLO)."""
    head = _recv_exactly(sock, HEADER_SIZE)
    if message_type(head) != HELLO_REPLY:
        raise AssertionError(f"expected HELLO_REPLY, got type {message_type(head):#x}")
    return decode_hello_reply(head + _recv_exactly(sock, head[4]))


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise Closed(f"closed after {len(data)} of {size} bytes")
        data += more
    return data


@dataclass(frozen=True, slots=True)
class Tally:
    """What a bystander got: completions counted exactly, all checked."""

    vm: int
    sent: int
    completed: int


def bystander(
    path: str | os.PathLike[str], vm: int, *, vps: int = 8, rounds: int = 20, tag: int = 0, first_vp: int = 0
) -> Tally:
    """A well-behaved VM: ``rounds`` of (every VP writes its own value, then reads it back) on ``PER_VP``.

    Its VPs are ``first_vp`` and the ``vps - 1`` after it (another connection
    of the same VM must use others: a VP has one intercept in flight).
    Each round's frames of all VPs go out in one write. Every completion is
    checked: COMPLETED, this VM, a VP that had exactly one intercept in
    flight, and for a read the value that VP wrote. A lost, duplicated or
    misaddressed completion, or any other frame, fails.
    """
    sent = completed = 0
    with VmClient(path, vm) as client:
        for round_ in range(rounds):
            indexes = range(first_vp, first_vp + vps)
            values = {vp: (tag << 24 | round_ << 12 | vp) & 0xFFFF_FFFF for vp in indexes}
            for write in (True, False):
                client.send(
                    intercept(PER_VP, vm=vm, vp=vp, write=write, value=values[vp] if write else 0, size=4)
                    for vp in indexes
                )
                sent += vps
                waiting = set(indexes)
                for completion in client.completions(vps):
                    assert completion.status is Status.COMPLETED, completion
                    assert completion.source_partition == vm, completion
                    assert completion.vp_index in waiting, f"a second or unasked completion: {completion}"
                    waiting.discard(completion.vp_index)
                    if not write:
                        assert completion.rax & 0xFFFF_FFFF == values[completion.vp_index], completion
                    completed += 1
    return Tally(vm, sent, completed)


class Background(Generic[T]):
    """Run a function in a thread; :meth:`result` returns what it returned, or re-raises what it raised."""

    def __init__(self, target: Callable[..., T], *args: object, **kwargs: object) -> None:
        self._result: T | None = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._result = target(*args, **kwargs)
            except BaseException as error:
                self._error = error

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float = 60.0) -> T:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return cast(T, self._result)


# The service's processes, from /proc.


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (the supervisor and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident memory of these processes together."""
    return sum(_status_kib(pid, "VmRSS") for pid in pids) * 1024


def vm_size_bytes(pid: int) -> int:
    """Address space a process has mapped (a 128 TiB region would show here)."""
    return _status_kib(pid, "VmSize") * 1024


def fd_count(pids: Sequence[int]) -> int:
    """Open descriptors of these processes together."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):  # gone meanwhile
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT, what: str = "the condition") -> None:
    """Poll ``condition()`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(0.05)


def sockets_as(uid: int, make: Callable[[], list[socket.socket]]) -> list[socket.socket]:
    """Sockets made by ``make`` in a child process running as user ``uid`` (root only), handed back here.

    The kernel records a socket's credentials (SO_PEERCRED) when it connects
    or listens: a socket connected by the child is that user's connection to
    the service, and a socket it listens on is that user's service, whoever
    uses the socket afterwards. No program needs to be run as that user.
    """
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        status = 1
        try:
            ours.close()
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            made = make()  # kept: a socket object closes its descriptor when collected
            fds = [sock.fileno() for sock in made]
            for at in range(0, len(fds), 200):
                socket.send_fds(theirs, [b"f"], fds[at : at + 200])
            theirs.sendall(b"e")
            status = 0
        except BaseException:
            traceback.print_exc()  # the parent's assertion says the child failed; this says why
        finally:
            os._exit(status)
    theirs.close()
    got: list[socket.socket] = []
    try:
        ours.settimeout(TIMEOUT)
        while True:
            message, fds, _, _ = socket.recv_fds(ours, 1, 200)
            got += [socket.socket(fileno=fd) for fd in fds]
            if message in (b"e", b""):
                break
    finally:
        ours.close()
        _, status = os.waitpid(pid, 0)
    if status != 0:
        for sock in got:
            sock.close()
        raise AssertionError(f"the child running as uid {uid} failed (wait status {status})")
    return got


def connect_many(path: str | os.PathLike[str], count: int) -> list[socket.socket]:
    """Up to ``count`` connections to ``path`` (fewer if connecting fails)."""
    made = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(path))
        except OSError:
            sock.close()
            break
        made.append(sock)
    return made


_DEATHS = ("killed by SIG", "did not stop within", "must be installed for", "exited with status 1")


def worker_deaths(log: str) -> list[str]:
    """The lines of a service's log that tell of a worker that died or had to be killed (not one that
    exited after a hung handler, which is how a worker is replaced)."""
    return [line for line in log.splitlines() if any(sign in line for sign in _DEATHS)]
