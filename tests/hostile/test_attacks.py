"""Attacks a hostile VMM (or a hostile local user) can make on ``serve``, each refused or contained.

Every test drives a real service process (isolated: a supervisor and one
worker per VM) over its UNIX socket, and checks that the service stays
up, that a bystander VM gets every completion it asked for and nothing
else, and that memory (RSS of the supervisor and its workers, from /proc)
and descriptors stay bounded. No assertion is on time: the bounds are on
bytes, descriptors and counts, and "answered at all within a generous
timeout".
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import mmap
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hostile_client import (
    TIMEOUT,
    Background,
    Closed,
    Refused,
    Tally,
    VmClient,
    bystander,
    connect_many,
    descendants,
    fd_count,
    hello_frame,
    intercept,
    open_raw,
    read_hello_reply,
    rep_outsb,
    rss_bytes,
    sockets_as,
    vm_size_bytes,
    wait_until,
    worker_deaths,
)
from hostile_devices import CMOS, ESCAPE, FIFO, HANG, HANG_SECONDS, OPEN_A_FILE, OPEN_A_SOCKET, SCRATCH, SLOW
from service_process import ServiceProcess

from dispatcher import (
    UNKNOWN_VP,
    Access,
    PortRange,
    Registers,
    Status,
    decode_completion,
    encode_announcement,
)
from dispatcher.hello import Capability, HelloReply, HelloStatus, encode_hello_reply
from dispatcher.wire import INTERCEPT_SIZE, Offset, pack_completion
from transports.service import poke as poke_status
from transports.service.control import Request, decode_reply, encode_request
from transports.shared_memory import encode_region

HERE = Path(__file__).parent
Serve = Callable[..., ServiceProcess]

ATTACKER, BYSTANDER = 1, 7
RAM = 0x10_0000  # where the attacker's memory sits in guest-physical memory
MiB = 1 << 20


def socket_of(service: ServiceProcess) -> Path:
    assert service.socket is not None
    return service.socket


def assert_exact(tally: Tally, vps: int = 8, rounds: int = 20) -> None:
    assert tally.sent == tally.completed == 2 * vps * rounds, tally


def assert_up(service: ServiceProcess) -> None:
    assert service.process.poll() is None, f"the service exited ({service.process.returncode}):\n{service.log}"


def stop(service: ServiceProcess, *, cut_off: int = 0) -> None:
    """SIGTERM after the attack: the service must still stop cleanly, and no worker have died on the way.

    ``cut_off``: workers that may be stopped at the end of the grace period, their intercepts unfinished.
    """
    assert_up(service)
    assert service.stop() == 0, service.log
    deaths = worker_deaths(service.log)
    cut = [line for line in deaths if "did not stop within" in line or "killed by SIGKILL" in line]
    assert len(cut) <= 2 * cut_off and [line for line in deaths if line not in cut] == [], service.log


def share(client: VmClient, fd: int, size: int, *, guest_physical: int = RAM) -> None:
    socket.send_fds(client.sock, [encode_region(guest_physical, size)], [fd])


# Crash: a memory region whose file shrinks under the service's mapping.


@pytest.mark.parametrize("backing", ["memfd", "file"])
def test_a_region_that_shrinks_cannot_crash_the_service(serve: Serve, tmp_path: Path, backing: str) -> None:
    service = serve()
    path = socket_of(service)
    size = 0x1_0000
    if backing == "memfd":
        fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    else:
        fd = os.open(tmp_path / "guest-ram", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, b"\xab" * 256, 0)
        with VmClient(path, ATTACKER) as attacker:
            share(attacker, fd, size)
            os.ftruncate(fd, 0)  # touching the mapping now would raise SIGBUS in whoever mapped it
            witness = Background(bystander, path, BYSTANDER)
            attacker.send([rep_outsb(FIFO, vm=ATTACKER, address=RAM, count=256)])
            answered = []
            with contextlib.suppress(Closed, ConnectionResetError):
                answered = attacker.completions(2)  # the region's refusal, then the string access's answer
            for completion in answered:
                # Refused when shared, or when touched: never a completion that read memory that is gone.
                assert completion.status is Status.MEMORY_ERROR, completion
            print(f"{backing}: {'refused' if answered else 'the worker ended'}: {answered}")
            assert_exact(witness.result())
    finally:
        os.close(fd)
    assert_up(service)
    assert_exact(bystander(path, BYSTANDER, tag=1))
    # The attacker's VM is served again (by a new worker, if its own died).
    with VmClient(path, ATTACKER) as again:
        assert again.exchange(intercept(SCRATCH, vm=ATTACKER)).status is Status.COMPLETED
    stop(service)


def test_a_sealed_memfd_serves_string_io(serve: Serve) -> None:
    """What the seal checks leave possible: a memfd sealed against shrinking works as guest memory."""
    service = serve()
    path = socket_of(service)
    size = 0x1_0000
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        message = bytes(range(1, 65))
        os.pwrite(fd, message, 0x100)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        with VmClient(path, ATTACKER) as client:
            share(client, fd, size)
            rcx = len(message)
            for _ in range(len(message) + 1):
                done = client.exchange(
                    rep_outsb(FIFO, vm=ATTACKER, address=RAM + 0x100 + len(message) - rcx, count=rcx)
                )
                assert done.status is Status.COMPLETED, done
                rcx = done.rcx
                if rcx == 0:
                    break
            back = bytes(client.exchange(intercept(FIFO, vm=ATTACKER, vp=1)).rax & 0xFF for _ in message)
            assert back == message
    finally:
        os.close(fd)
    stop(service)


def has_seccomp() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("seccomp", "pyseccomp"))


@pytest.mark.skipif(not has_seccomp(), reason="no seccomp binding: the sandbox's filter cannot be loaded here")
def test_device_code_cannot_open_files_or_sockets(serve: Serve) -> None:
    """The sandbox: what a device bug a guest could steer might try fails in that worker, and the VM goes on."""
    service = serve()
    path = socket_of(service)
    with VmClient(path, ATTACKER) as client:
        for what in (OPEN_A_FILE, OPEN_A_SOCKET):
            answer = client.exchange(intercept(ESCAPE, vm=ATTACKER, write=True, value=what))
            assert answer.status is Status.HANDLER_FAILED, (what, answer)
        assert client.exchange(intercept(SCRATCH, vm=ATTACKER)).status is Status.COMPLETED
    assert "Permission denied" in service.log or "EPERM" in service.log or "Operation not permitted" in service.log
    stop(service)


# Cross-VM: a VM reaches only its own devices.


def test_a_vm_reaches_only_its_own_devices(serve: Serve) -> None:
    service = serve()
    path = socket_of(service)
    with VmClient(path, 1) as first, VmClient(path, 2) as second:
        assert first.exchange(intercept(SCRATCH, vm=1, write=True, value=0x11)).status is Status.COMPLETED
        seen = second.exchange(intercept(SCRATCH, vm=2))
        assert seen.status is Status.COMPLETED and seen.rax & 0xFF == 0  # VM 2's own CMOS, untouched
        # A frame naming another VM on VM 1's connection reaches no device.
        refused = first.exchange(intercept(SCRATCH, vm=2, write=True, value=0x22))
        assert refused.status is Status.PROTOCOL_ERROR and refused.detail == Offset.PARTITION, refused
        assert second.exchange(intercept(SCRATCH, vm=2)).rax & 0xFF == 0
        # The VM's own devices stay its own across its connections.
        with VmClient(path, 1) as again:
            assert again.exchange(intercept(SCRATCH, vm=1)).rax & 0xFF == 0x11
        # Each VM in a process of its own: the supervisor and two workers.
        assert len(descendants(service.process.pid)) >= 3
    stop(service)


# Unbounded memory: intercepts for async handlers from a client that never reads its completions.


def flood(path: Path, vm: int, *, connections: int, seconds: float, frames_limit: int) -> int:
    """Send intercepts to the async register, every one from a new VP, never reading; frames the kernel took."""
    clients = [VmClient(path, vm) for _ in range(connections)]
    pending = [b""] * connections
    taken_bytes = vp = 0
    try:
        for client in clients:
            client.sock.setblocking(False)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and taken_bytes < frames_limit * INTERCEPT_SIZE:
            progressed = False
            for index, client in enumerate(clients):
                if not pending[index]:
                    pending[index] = b"".join(intercept(SLOW, vm=vm, vp=(vp + i) & 0xFFFF_FFFF) for i in range(64))
                    vp += 64
                try:
                    taken = client.sock.send(pending[index])
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    continue  # the service ended this connection: also a way to contain it
                pending[index] = pending[index][taken:]
                taken_bytes += taken
                progressed = True
            if not progressed:
                time.sleep(0.01)
    finally:
        for client in clients:
            client.close()
    return taken_bytes // INTERCEPT_SIZE


def test_a_client_that_never_reads_cannot_grow_the_service(serve: Serve) -> None:
    service = serve()
    path = socket_of(service)
    assert_exact(bystander(path, BYSTANDER, rounds=2), rounds=2)
    with VmClient(path, ATTACKER) as warm:  # the attacker's worker exists before the baseline
        warm.exchange(intercept(SCRATCH, vm=ATTACKER))
    pids = descendants(service.process.pid)
    baseline = rss_bytes(pids)
    witness = Background(bystander, path, BYSTANDER, rounds=10)
    peak = [baseline]
    flooding = threading.Event()
    flooding.set()

    def watch() -> None:
        while flooding.is_set():
            peak[0] = max(peak[0], rss_bytes(descendants(service.process.pid)))
            time.sleep(0.05)

    watcher = Background(watch)
    try:
        sent = flood(path, ATTACKER, connections=4, seconds=3.0, frames_limit=400_000)
    finally:
        flooding.clear()
    assert_exact(witness.result(), rounds=10)
    watcher.result()
    peak[0] = max(peak[0], rss_bytes(descendants(service.process.pid)))
    growth = peak[0] - baseline
    print(f"flood: {sent} intercepts sent, service RSS {baseline / MiB:.0f} MiB -> peak {peak[0] / MiB:.0f} MiB")
    assert growth < 48 * MiB, f"the service grew by {growth / MiB:.0f} MiB while {sent} intercepts went unread"
    assert_up(service)
    assert_exact(bystander(path, BYSTANDER, tag=2))
    # The intercepts the attacker's VM had received are still being finished (for a peer that has gone):
    # its worker may be stopped at the end of the grace period.
    stop(service, cut_off=1)


def test_a_tool_that_never_reads_its_replies_cannot_grow_the_service(serve: Serve) -> None:
    service = serve()
    path = socket_of(service)
    assert_exact(bystander(path, BYSTANDER, rounds=2), rounds=2)
    baseline = rss_bytes(descendants(service.process.pid))
    one = encode_request(Request.INSPECT)
    requests = one * 4096
    sent = 0
    tools = [open_raw(path) for _ in range(4)]
    pending = [requests] * len(tools)
    try:
        for tool in tools:
            tool.setblocking(False)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            progressed = False
            for index, tool in enumerate(tools):
                try:
                    taken = tool.send(pending[index])
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    continue  # the service closed this connection: also a way to contain it
                sent += taken
                pending[index] = pending[index][taken:] or requests
                progressed = True
            if not progressed:
                time.sleep(0.01)
        grown = rss_bytes(descendants(service.process.pid)) - baseline
        print(f"control: {sent // len(one)} requests sent unread, service RSS grew {grown / MiB:.0f} MiB")
        assert grown < 48 * MiB, f"the service grew by {grown / MiB:.0f} MiB"
        assert_exact(bystander(path, BYSTANDER, tag=7))
    finally:
        for tool in tools:
            tool.close()
    stop(service)


# Freeze: a synchronous handler that never returns.

BEFORE_THE_HANG_ENDS = HANG_SECONDS / 2
"""How long a read waits for the watchdog's answer: generous, and still before the hung handler would return."""


def test_a_hung_handler_stalls_no_other_vm_nor_the_stop(serve: Serve) -> None:
    service = serve("--grace", "5", deadline="1")
    path = socket_of(service)
    with VmClient(path, ATTACKER) as hung:
        hung.send([intercept(HANG, vm=ATTACKER, vp=3)])
        # While the handler hangs, other VMs are served (the hang lasts far longer than this).
        assert_exact(bystander(path, BYSTANDER, rounds=5), rounds=5)
        # The watchdog answers the hung intercept, then ends the connection.
        hung.sock.settimeout(BEFORE_THE_HANG_ENDS)
        (answer,) = hung.completions(1)
        assert answer.status is Status.DEADLINE_EXCEEDED and answer.vp_index == 3, answer
        assert hung.read_until_closed(limit=16) == []
    # The VM is served again, by a fresh worker.
    with VmClient(path, ATTACKER) as again:
        assert again.exchange(intercept(SCRATCH, vm=ATTACKER)).status is Status.COMPLETED
    # SIGTERM while a handler hangs: the service still stops, well before the handler would return.
    with VmClient(path, ATTACKER) as hung:
        hung.send([intercept(HANG, vm=ATTACKER, vp=4)])
        assert_exact(bystander(path, BYSTANDER, rounds=2, tag=3), rounds=2)
        service.signal(signal.SIGTERM)
        hung.sock.settimeout(BEFORE_THE_HANG_ENDS)
        frames = hung.read_until_closed(limit=16)
        assert [decode_completion(f).status for f in frames] == [Status.DEADLINE_EXCEEDED], frames
        assert service.wait(timeout=20) == 0, service.log
    assert worker_deaths(service.log) == [], service.log


def test_a_connection_closing_while_its_vm_hangs_stalls_nothing(serve: Serve) -> None:
    """Another connection of the hung VM closing must not wait for the hung handler: the watchdog still answers."""
    service = serve("--grace", "5", deadline="1")
    path = socket_of(service)
    with VmClient(path, ATTACKER) as hung:
        other = VmClient(path, ATTACKER)
        assert other.exchange(intercept(SCRATCH, vm=ATTACKER, vp=1)).status is Status.COMPLETED
        hung.send([intercept(HANG, vm=ATTACKER, vp=3)])
        time.sleep(0.3)  # not a measurement: gives the handler time to start before the other connection closes
        other.close()
        hung.sock.settimeout(BEFORE_THE_HANG_ENDS)
        (answer,) = hung.completions(1)
        assert answer.status is Status.DEADLINE_EXCEEDED and answer.vp_index == 3, answer
    assert_exact(bystander(path, BYSTANDER, rounds=2), rounds=2)
    stop(service)


# Exhaustion: connections, regions, workers and region sizes.


@contextlib.contextmanager
def descriptor_limit(limit: int) -> Iterator[None]:
    """The soft RLIMIT_NOFILE of processes started inside (a service inherits it), as on many hosts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def sealed_memfd(size: int) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


OTHER_USER = 65534  # nobody: the attacker in the tests that need a bystander of another user
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the attacker as another user")


@pytest.fixture
def shared_directory() -> Iterator[Path]:
    """A directory another user can reach, for the service's socket (tmp_path is root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="hostile-"))
    try:
        directory.chmod(0o755)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def hold_connections(sockets: list[socket.socket], vm: int, regions: int) -> tuple[list[VmClient], Counter[str]]:
    """Open VM ``vm`` on each socket and share ``regions`` one-page memfds on each; what the service allowed."""
    held: list[VmClient] = []
    outcome: Counter[str] = Counter()
    for sock in sockets:
        try:
            client = VmClient(sock, vm)
        except Refused as refusal:
            outcome[f"refused: {refusal.reason}"] += 1
            continue
        except (Closed, OSError):
            outcome["closed"] += 1
            continue
        held.append(client)
        with contextlib.suppress(OSError, Closed):
            for index in range(regions):
                fd = sealed_memfd(mmap.PAGESIZE)
                try:
                    share(client, fd, mmap.PAGESIZE, guest_physical=RAM + index * 2 * mmap.PAGESIZE)
                finally:
                    os.close(fd)
            # Everything sent has been handled once the probe's completion is back.
            client.send([intercept(SCRATCH, vm=vm, vp=9)])
            refused = 0
            for _ in range(regions + 1):
                (completion,) = client.completions(1)
                if completion.vp_index == 9:
                    break
                assert completion.vp_index == UNKNOWN_VP and completion.status is Status.MEMORY_ERROR, completion
                refused += 1
            outcome["regions mapped"] += regions - refused
    outcome["held"] = len(held)
    return held, outcome


@needs_root
def test_connections_and_regions_cannot_exhaust_descriptors(serve: Serve, shared_directory: Path) -> None:
    with descriptor_limit(1024):
        service = serve("--mode", "0666", socket=shared_directory / "s.sock")
    path = socket_of(service)
    assert_exact(bystander(path, BYSTANDER, rounds=2), rounds=2)
    baseline = fd_count(descendants(service.process.pid))
    # Before: 17 connections of 64 regions each filled 1024 descriptors. Now from another user.
    sockets = sockets_as(OTHER_USER, functools.partial(connect_many, path, 100))
    _, got = hold_connections(sockets, ATTACKER, 64)
    try:
        during = fd_count(descendants(service.process.pid))
        print(f"the attacker got {dict(got)}; service descriptors {baseline} -> {during}")
        assert got["held"] <= 64, got  # --max-connections-per-uid
        assert got["regions mapped"] <= 64, got  # the VM's region budget
        # A few descriptors per connection held (its socket, its reader's wake-up pipe), none per region.
        assert during < baseline + 4 * 64 + 32, f"the service holds {during} descriptors"
        # Another user's VM still gets in and is answered exactly.
        assert_exact(bystander(path, BYSTANDER, tag=4))
        assert_up(service)
    finally:
        for sock in sockets:
            sock.close()
    wait_until(lambda: fd_count(descendants(service.process.pid)) <= baseline + 8, what="descriptors back to baseline")
    stop(service)


def test_an_enormous_region_is_refused(serve: Serve) -> None:
    service = serve()
    path = socket_of(service)
    size = 1 << 47  # 128 TiB, sparse
    fd = sealed_memfd(size)
    try:
        with VmClient(path, ATTACKER) as client:
            share(client, fd, size)
            (refusal,) = client.completions(1)
            assert refusal.vp_index == UNKNOWN_VP and refusal.status is Status.MEMORY_ERROR, refusal
            assert client.exchange(intercept(SCRATCH, vm=ATTACKER)).status is Status.COMPLETED
            largest = max(vm_size_bytes(pid) for pid in descendants(service.process.pid))
            assert largest < 1 << 40, f"a service process maps {largest / (1 << 40):.0f} TiB"
    finally:
        os.close(fd)
    stop(service)


@needs_root
def test_a_flood_of_vms_cannot_start_unbounded_workers(serve: Serve, shared_directory: Path) -> None:
    service = serve("--mode", "0666", "--max-connections-per-uid", "4", socket=shared_directory / "s.sock")
    path = socket_of(service)
    assert_exact(bystander(path, BYSTANDER, rounds=2), rounds=2)
    sockets = sockets_as(OTHER_USER, functools.partial(connect_many, path, 40))
    try:
        for vm, sock in enumerate(sockets, start=1000):
            sock.settimeout(TIMEOUT)
            with contextlib.suppress(OSError):
                sock.sendall(hello_frame(vm))
        statuses: Counter[str] = Counter()
        for sock in sockets:
            try:
                statuses[read_hello_reply(sock).status.name] += 1
            except (OSError, Closed):
                statuses["closed without a reply"] += 1
        processes = len(descendants(service.process.pid))
        print(f"{len(sockets)} VMs asked: {dict(statuses)}; {processes} service processes")
        assert statuses["ACCEPTED"] <= 4, statuses
        assert processes <= 1 + 1 + 4, f"{processes} service processes"
        # Another user is still served, on its VM and on a new one.
        assert_exact(bystander(path, BYSTANDER, tag=5))
        assert_exact(bystander(path, BYSTANDER + 1, rounds=2), rounds=2)
    finally:
        for sock in sockets:
            sock.close()
    stop(service)


def open_and_leave(path: Path, first: int, count: int) -> list[socket.socket]:
    """Connect, open VM ``first + i`` and read the reply, close; for each of ``count`` VMs in turn."""
    for vm in range(first, first + count):
        with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(path))
            sock.sendall(hello_frame(vm))
            with contextlib.suppress(OSError, Closed):
                read_hello_reply(sock)
    return []


@needs_root
def test_vms_that_come_and_go_cannot_pile_up_workers(serve: Serve, shared_directory: Path) -> None:
    """A worker outlives its VM's connections (the devices keep their state): one user must not be able to
    gather workers by opening one VM after another."""
    service = serve("--mode", "0666", "--max-connections-per-uid", "2", socket=shared_directory / "s.sock")
    path = socket_of(service)
    with VmClient(path, BYSTANDER) as owner:  # another user's VM, idle while the attacker churns
        assert owner.exchange(intercept(SCRATCH, vm=BYSTANDER, write=True, value=0x42)).status is Status.COMPLETED
    sockets_as(OTHER_USER, functools.partial(open_and_leave, path, 2000, 6))
    processes = len(descendants(service.process.pid))
    print(f"6 VMs opened and left by one user: {processes} service processes")
    assert processes <= 1 + 1 + 2, f"{processes} service processes: one user gathered {processes - 2} workers"
    with VmClient(path, BYSTANDER) as owner:  # its worker, and its devices' state, were left alone
        assert owner.exchange(intercept(SCRATCH, vm=BYSTANDER)).rax & 0xFF == 0x42
    assert_exact(bystander(path, BYSTANDER + 1, rounds=2), rounds=2)
    stop(service)


@needs_root
def test_another_user_cannot_open_a_vm_in_use(serve: Serve, shared_directory: Path) -> None:
    """The VM id is the HELLO's word only: a second user naming a VM that another user's VMM runs is refused."""
    service = serve("--mode", "0666", socket=shared_directory / "s.sock")
    path = socket_of(service)
    with VmClient(path, BYSTANDER) as owner:
        assert owner.exchange(intercept(SCRATCH, vm=BYSTANDER, write=True, value=0x5C)).status is Status.COMPLETED
        (sock,) = sockets_as(OTHER_USER, functools.partial(connect_many, path, 1))
        with sock:
            sock.settimeout(TIMEOUT)
            sock.sendall(hello_frame(BYSTANDER))
            reply = read_hello_reply(sock)
            assert reply.status is HelloStatus.REFUSED, f"uid {OTHER_USER} joined VM {BYSTANDER}: {reply}"
        assert owner.exchange(intercept(SCRATCH, vm=BYSTANDER)).rax & 0xFF == 0x5C
    stop(service)


def ask(sock: socket.socket, request: bytes) -> tuple[int, bytes]:
    """One control request on a raw socket: the reply's status and its whole document."""
    sock.sendall(request)
    document = b""
    for _ in range(1 << 16):
        head = sock.recv(16, socket.MSG_WAITALL)
        if len(head) < 16:
            raise Closed("closed in the middle of a control reply")
        reply = decode_reply(head + sock.recv(head[4], socket.MSG_WAITALL))
        document += reply.data
        if reply.final:
            return reply.status, document
    raise AssertionError("a control reply that never ends")


@needs_root
def test_another_user_cannot_read_a_vms_device_state(serve: Serve, shared_directory: Path) -> None:
    """``inspect`` shows device registers: another user must not read those of a VM that is not theirs."""
    service = serve("--mode", "0666", socket=shared_directory / "s.sock")
    path = socket_of(service)
    secret = 0xC5
    with VmClient(path, BYSTANDER) as owner:
        owner.send([intercept(CMOS, vm=BYSTANDER, write=True, value=0x0E),
                    intercept(CMOS + 1, vm=BYSTANDER, vp=1, write=True, value=secret)])  # fmt: skip
        assert [c.status for c in owner.completions(2)] == [Status.COMPLETED] * 2
        (sock,) = sockets_as(OTHER_USER, functools.partial(connect_many, path, 1))
        with sock:
            sock.settimeout(TIMEOUT)
            for request in (encode_request(Request.INSPECT, vm=BYSTANDER), encode_request(Request.INSPECT)):
                try:
                    status, document = ask(sock, request)
                except (Closed, OSError):
                    break  # refused outright: nothing read
                print(f"uid {OTHER_USER} asked INSPECT: status {status}, {len(document)} bytes")
                assert f"{secret:#x}".encode() not in document and b"last" not in document, document[:2000]
    stop(service)


def test_silent_connections_are_closed_and_stall_no_one(serve: Serve) -> None:
    service = serve("--opening-timeout", "0.5")
    path = socket_of(service)
    silent = [open_raw(path) for _ in range(32)]
    try:
        assert_exact(bystander(path, BYSTANDER, rounds=5), rounds=5)
        for sock in silent:  # each gets a REFUSED reply saying why, then the end of the stream
            reply = read_hello_reply(sock)
            assert reply.status is HelloStatus.REFUSED and "HELLO" in reply.reason, reply
            assert drain(sock) == 0
    finally:
        for sock in silent:
            sock.close()
    stop(service)


# Impostor: a service of another user at the path a client expects.


def impersonate(listener: socket.socket, answer: bytes, seen: list[bytes]) -> None:
    """Serve as an impostor would: take whatever comes, answer with ``answer``, until the listener closes."""
    with contextlib.suppress(OSError):
        for _ in range(16):
            peer, _ = listener.accept()
            with peer, contextlib.suppress(OSError):
                peer.settimeout(5)
                seen.append(peer.recv(4096))
                peer.sendall(answer)
                seen.append(peer.recv(4096))


@needs_root
@pytest.mark.parametrize("tool", [("poke", "inb", "0x3ff"), ("stats",), ("inspect",)], ids=lambda t: t[0])
def test_a_client_refuses_a_service_of_another_user(shared_directory: Path, tool: tuple[str, ...]) -> None:
    """A socket another user bound first where the client looks (a /tmp path): the client says so and stops."""
    shared_directory.chmod(0o1777)  # anyone may create in it, as in /tmp
    path = shared_directory / "intercept-dispatch.sock"

    def listen() -> list[socket.socket]:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        os.chmod(path, 0o666)
        listener.listen()
        return [listener]

    (listener,) = sockets_as(OTHER_USER, listen)
    answer = encode_hello_reply(HelloReply(0, capabilities=Capability.GUEST_MEMORY))
    answer += b"".join(encode_announcement([PortRange(0x3F8, 0x3FF, Access.READ_WRITE)]))
    answer += b"".join(pack_completion(0, 0, Status.COMPLETED, Registers.RAX, 0, 0x99) for _ in range(4))
    seen: list[bytes] = []
    impostor = Background(impersonate, listener, answer, seen)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "examples", tool[0], "--socket", str(path), "--timeout", "10", *tool[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the impostor's accept()
        listener.close()
        impostor.result()
    assert run.returncode == poke_status.REFUSED if tool[0] == "poke" else run.returncode != 0, run
    assert f"uid {OTHER_USER}" in run.stderr, run.stderr
    assert run.stdout == "" and len(run.stderr.strip().splitlines()) == 1, run.stderr
    # The client told the impostor nothing: no intercept, not even a HELLO.
    assert not any(seen), seen


def refused_start(tmp_path: Path, socket_path: Path) -> ServiceProcess:
    """``serve`` on ``socket_path``, expected to refuse to start; killed (and the test failed) if it serves."""
    process = ServiceProcess(tmp_path, "--device", "hostile_devices:vm_devices", socket=socket_path, ready=False,
                             cwd=HERE)  # fmt: skip
    wait_until(lambda: process.process.poll() is not None or "serving on" in process.log, what="serve to answer")
    status = process.process.poll()
    if status is None:
        for pid in reversed(descendants(process.process.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    process.wait()
    assert status == 1, f"serve did not refuse {socket_path} (status {status}):\n{process.log}"
    return process


def test_serve_refuses_a_directory_where_others_could_replace_its_socket(tmp_path: Path) -> None:
    open_directory = tmp_path / "open"
    open_directory.mkdir()
    open_directory.chmod(0o777)  # anyone may write, and it is not sticky: anyone may remove what is there
    refused = refused_start(tmp_path, open_directory / "s.sock")
    assert str(open_directory) in refused.log and "other users may write" in refused.log, refused.log
    assert len(refused.log.strip().splitlines()) == 1, refused.log
    assert not (open_directory / "s.sock").exists()


@needs_root
def test_serve_refuses_a_socket_path_another_user_took_first(tmp_path: Path, shared_directory: Path) -> None:
    shared_directory.chmod(0o1777)  # as /tmp
    path = shared_directory / "intercept-dispatch.sock"

    def listen() -> list[socket.socket]:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen()
        return [listener]

    (listener,) = sockets_as(OTHER_USER, listen)
    with listener:
        refused = refused_start(tmp_path, path)
    assert str(path) in refused.log and len(refused.log.strip().splitlines()) == 1, refused.log
    assert os.stat(path).st_uid == OTHER_USER  # left alone


# Planted code: modules in the working directory are never imported.

PLANTED = "import os; open(os.environ['PLANTED_MARKER'], 'a').write(__name__ + '\\n')\n"


@pytest.mark.parametrize("mode", [(), ("--in-process",)], ids=["isolated", "in-process"])
def test_code_planted_in_the_working_directory_never_runs(tmp_path: Path, mode: tuple[str, ...]) -> None:
    planted = tmp_path / "planted"
    for package in ("examples", "dispatcher", "transports", "anyio"):
        (planted / package).mkdir(parents=True)
        (planted / package / "__init__.py").write_text(PLANTED)
    for module in ("hostile_devices", "sitecustomize", "usercustomize", "planted_only"):
        (planted / f"{module}.py").write_text(PLANTED + "def vm_devices(): raise SystemExit(9)\n")
    marker = tmp_path / "ran"
    env = {**os.environ, "PLANTED_MARKER": str(marker)}
    env.pop("PYTHONPATH", None)
    script = Path(sys.executable).parent / "intercept-dispatch"
    command = [str(script)] if script.exists() else [sys.executable, "-P", "-m", "examples"]
    path = tmp_path / "s.sock"
    log = tmp_path / "serve.log"
    with open(log, "wb") as errors:
        process = subprocess.Popen(
            [*command, "serve", *mode, "--socket", str(path), "--device", "hostile_devices:vm_devices",
             "--device-path", str(HERE)],
            cwd=planted, env=env, stderr=errors, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_until(lambda: "serving on" in log.read_text() or process.poll() is not None, what="serving")
            with VmClient(path, ATTACKER) as client:  # starts the VM's worker, in the same directory
                assert client.exchange(intercept(SCRATCH, vm=ATTACKER)).status is Status.COMPLETED
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                status = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                for pid in reversed(descendants(process.pid)):
                    os.kill(pid, signal.SIGKILL)
                status = process.wait()
        assert status == 0, log.read_text()
        # A module only the working directory has is not found: the devices are named, never guessed.
        refused = subprocess.run(
            [*command, "serve", *mode, "--socket", str(path), "--device", "planted_only:vm_devices"],
            cwd=planted, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert refused.returncode == 1, refused.stderr
    assert "cannot load the devices" in refused.stderr and "planted_only" in refused.stderr, refused.stderr
    assert not marker.exists(), f"planted code ran: {marker.read_text()}"


# Log amplification: junk must not turn into an unbounded log.


def junk_intercepts(rng: random.Random, count: int) -> bytes:
    """Frames that can be delimited but not accepted, each from a different partition and VP."""
    frames = []
    for _ in range(count):
        frame = bytearray(intercept(rng.randrange(1 << 16), vm=rng.randrange(1 << 64), vp=rng.randrange(1 << 32)))
        frame[Offset.ACCESS_TYPE] = rng.choice((2, 3, 0x7F))  # neither read nor write
        frames.append(bytes(frame))
    return b"".join(frames)


def drain(sock: socket.socket) -> int:
    """Read and discard until the service closes; bytes read."""
    total = 0
    with contextlib.suppress(OSError):
        while data := sock.recv(1 << 16):
            total += len(data)
    return total


def test_junk_cannot_amplify_the_log(serve: Serve) -> None:
    service = serve()
    path = socket_of(service)
    rng = random.Random(4)
    junk = 0
    # Junk intercepts on VMM connections (each from a partition of its own), read back as they come.
    for _ in range(12):
        with VmClient(path, ATTACKER) as client:
            reader = Background(drain, client.sock)
            for _ in range(16):
                batch = junk_intercepts(rng, 128)
                client.sock.sendall(batch)
                junk += len(batch)
            client.sock.shutdown(socket.SHUT_WR)
            reader.result()
    # Garbage as the opening frame, and junk region frames.
    for _ in range(64):
        sock = open_raw(path)
        try:
            garbage = rng.randbytes(16 * 1024)
            with contextlib.suppress(OSError):
                sock.sendall(garbage)
                junk += len(garbage)
            drain(sock)
        finally:
            sock.close()
    with VmClient(path, ATTACKER) as client:
        for _ in range(256):
            fd = sealed_memfd(mmap.PAGESIZE)
            try:
                bad = bytearray(encode_region(rng.randrange(1 << 40), mmap.PAGESIZE))
                bad[Offset.REGION_FLAGS] = 0x80  # an unknown flag
                socket.send_fds(client.sock, [bytes(bad)], [fd])
                junk += len(bad)
            finally:
                os.close(fd)
        client.sock.shutdown(socket.SHUT_WR)
        drain(client.sock)
    assert_up(service)
    assert_exact(bystander(path, BYSTANDER, tag=6))
    stop(service)  # writes the summaries held back
    size = service.log_path.stat().st_size
    print(f"{junk} bytes of junk, {size} bytes of log")
    assert junk > 4 * MiB
    assert size < 256 * 1024, f"{junk} bytes of junk made {size} bytes of log"


def test_frames_that_are_not_intercepts_are_answered_not_obeyed(serve: Serve) -> None:
    """Control and HELLO frames inside a VMM's session are protocol errors; the session goes on."""
    service = serve()
    path = socket_of(service)
    with VmClient(path, ATTACKER) as client:
        # A second HELLO (naming another VM, too) and a control request.
        stray = [hello_frame(BYSTANDER), encode_request(Request.INSPECT)]
        for frame in stray:
            answer = client.exchange(frame)
            assert answer.status is Status.PROTOCOL_ERROR, answer
            assert answer.detail in (Offset.MESSAGE_TYPE, Offset.PARTITION), answer
        assert client.exchange(intercept(SCRATCH, vm=ATTACKER)).status is Status.COMPLETED
    stop(service)


def test_a_refused_hello_says_why(serve: Serve) -> None:
    service = serve()
    path = socket_of(service)
    sock = open_raw(path)
    try:
        wrong = bytearray(hello_frame(ATTACKER))
        wrong[Offset.HELLO_MAJOR] = 9
        sock.sendall(bytes(wrong))
        reply = read_hello_reply(sock)
        assert reply.status is HelloStatus.INCOMPATIBLE_VERSION and "9.0" in reply.reason, reply
        assert drain(sock) == 0  # and closed
    finally:
        sock.close()
    stop(service)
