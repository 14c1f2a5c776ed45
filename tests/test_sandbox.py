"""The worker sandbox: each case runs in a subprocess (this file run as a script), since a sandbox is for good.

The child serves intercepts and string I/O over a UNIX socket with a shared
memfd under the filter, on each event loop, then tries what the filter
denies, and prints one JSON report on its last line.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import resource
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from transports.service.sandbox import (
    ALLOWED,
    DEFAULT_ADDRESS_SPACE,
    SandboxError,
    SandboxLimits,
    SandboxUnavailableError,
    check_sandbox,
    drop_privileges,
    seccomp_binding,
)

HERE = Path(__file__).parent
GIB = 1 << 30


def has_seccomp() -> bool:
    try:
        seccomp_binding()
    except SandboxUnavailableError:
        return False
    return True


needs_seccomp = pytest.mark.skipif(not has_seccomp(), reason="no libseccomp binding (pip install pyseccomp)")


def run_child(*args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return report


@needs_seccomp
@pytest.mark.parametrize("backend", ["asyncio", "trio", "uvloop"])
def test_a_worker_serves_under_the_filter_and_is_denied_the_rest(backend: str) -> None:
    report = run_child("worker", backend)
    # What a worker does works: socket I/O with descriptors, a shared memfd mapped, string I/O through it,
    # threads started after the filter, thread pools, anonymous mmap, signals to itself.
    assert report["completion"] == "COMPLETED" and report["guest_wrote"] == "abc"
    assert report["unmapped"] and report["thread"] and report["to_thread"] and report["mmap"] and report["signal"]
    # What it must not do fails with EPERM, on the threads started before the filter too.
    assert report["denied"] == {
        name: errno.EPERM
        for name in ("socket", "execve", "open", "fork", "connect", "ptrace", "raise_limit", "thread_socket")
    }
    assert report["status"] == {"NoNewPrivs": "1", "Seccomp": "2"}
    assert report["rlimit_as"] == [8 * GIB, 8 * GIB] and report["rlimit_nofile"] == [64, 64]
    assert report["over_address_space"] == "MemoryError"


def test_without_seccomp_the_limits_still_hold() -> None:
    report = run_child("no-seccomp")
    assert report["status"] == {"NoNewPrivs": "1", "Seccomp": "0"}
    assert report["rlimit_as"] == [8 * GIB, 8 * GIB] and report["rlimit_nofile"] == [64, 64]
    assert report["socket"] == "allowed"


@needs_seccomp
def test_uvloop_with_its_io_uring_is_refused_in_one_line() -> None:
    report = run_child("uvloop-io-uring")
    if not report["io_uring"]:
        pytest.skip("libuv did not set up an io_uring here (kernel without it)")
    assert report["error"].startswith("the event loop uses io_uring (uvloop)")
    assert "deny_io_uring()" in report["error"] and "\n" not in report["error"]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_dropping_privileges_is_for_good() -> None:
    report = run_child("drop", "nobody")
    nobody = pwd.getpwnam("nobody")
    assert report["ids"] == [[nobody.pw_uid] * 3, [nobody.pw_gid] * 3, []]
    assert report["back_to_root"] == errno.EPERM


def test_an_unknown_user_is_named() -> None:
    with pytest.raises(SandboxError, match=r"^--user no-such-user-here: no such user$"):
        drop_privileges("no-such-user-here")
    with pytest.raises(SandboxError, match="no such user"):
        check_sandbox(SandboxLimits(user="no-such-user-here", seccomp=False))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may switch user")
def test_switching_user_without_root_says_why() -> None:
    other = next(p.pw_name for p in pwd.getpwall() if p.pw_uid not in (os.getuid(), 0))
    with pytest.raises(SandboxError, match="start the service as root"):
        drop_privileges(other)


def test_without_a_binding_the_message_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "seccomp", None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "pyseccomp", None)
    with pytest.raises(SandboxUnavailableError) as caught:
        check_sandbox(SandboxLimits())
    message = str(caught.value)
    assert message.startswith("seccomp is unavailable: no libseccomp binding") and "--no-seccomp" in message
    assert "\n" not in message
    check_sandbox(SandboxLimits(seccomp=False))  # told to run without: nothing to check


def test_limits_travel_as_json_and_bad_ones_are_named() -> None:
    limits = SandboxLimits(address_space=8 * GIB, open_files=128, user="nobody", seccomp=False)
    assert SandboxLimits.from_json(json.loads(json.dumps(limits.as_json()))) == limits
    assert SandboxLimits.from_json({}) == SandboxLimits()
    assert SandboxLimits().address_space == DEFAULT_ADDRESS_SPACE == 72 * GIB
    with pytest.raises(SandboxError, match="unknown field 'cpu'"):
        SandboxLimits.from_json({"cpu": 1})
    with pytest.raises(SandboxError, match="open_files is '64', not a whole number"):
        SandboxLimits.from_json({"open_files": "64"})
    with pytest.raises(SandboxError, match="open files limit 3: out of range"):
        SandboxLimits(open_files=3)
    with pytest.raises(SandboxError, match="address space limit 1000: out of range"):
        SandboxLimits(address_space=1000)


def test_an_address_space_below_what_is_in_use_is_refused() -> None:
    report = run_child("too-small")
    assert report["error"].startswith("address space limit 67108864: below the ")


def test_the_allow_list_denies_what_it_must() -> None:
    allowed = {name for name, _ in ALLOWED}
    for denied in ("execve", "execveat", "fork", "vfork", "open", "openat", "openat2", "socket", "connect", "bind",
                   "listen", "accept", "accept4", "ptrace", "process_vm_readv", "process_vm_writev", "mount",
                   "io_uring_setup", "bpf", "setuid", "unshare"):  # fmt: skip
        assert denied not in allowed
    assert all(why for _, why in ALLOWED)


# The child side.


def _status(fd: int) -> dict[str, str]:
    text = os.pread(fd, 1 << 16, 0).decode()
    fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return {name: fields[name].strip() for name in ("NoNewPrivs", "Seccomp")}


def _errno_of(action: Any) -> int | None:
    try:
        action()
    except OSError as error:
        return error.errno
    return None


def _fork() -> None:
    pid = os.fork()
    if pid == 0:  # the filter let it through: leave at once
        os._exit(0)
    os.waitpid(pid, 0)


def _raise_limit() -> None:
    # Root could raise a hard limit again, but for the filter; CPython reports the EPERM as a ValueError.
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    try:
        resource.setrlimit(resource.RLIMIT_AS, unlimited)
    except ValueError as error:
        if str(error) == "not allowed to raise maximum limit":
            raise PermissionError(errno.EPERM, str(error)) from None
        raise


def _ptrace() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(16, os.getppid(), 0, 0) != 0:  # PTRACE_ATTACH
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def child_worker(backend: str) -> dict[str, Any]:
    import mmap
    import signal
    import socket

    import anyio
    import anyio.to_thread

    sys.path.insert(0, str(HERE / "string_io"))
    from string_driver import Vp, instruction

    from dispatcher import Dispatcher, PortAccess, Router, Status, decode_completion
    from transports.service.sandbox import apply_sandbox, deny_io_uring
    from transports.shared_memory import SharedMemoryTransport, memfd_for_sharing, share_region, unshare_region
    from transports.unix import UnixTransport

    deny_io_uring()
    status = os.open("/proc/self/status", os.O_RDONLY)
    report: dict[str, Any] = {}
    go, went = threading.Event(), threading.Event()
    denied: dict[str, int | None] = {}

    def early_thread() -> None:  # running before the filter is loaded: TSYNC must cover it
        go.wait()
        denied["thread_socket"] = _errno_of(socket.socket)
        went.set()

    threading.Thread(target=early_thread, daemon=True).start()
    port = 0x1F0
    received: list[int] = []

    def device(access: PortAccess) -> int | None:
        received.append(access.value)
        return None

    router = Router()
    router.add(device, port, 1)

    async def main() -> None:
        vmm_socket, service_socket = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = memfd_for_sharing("guest-ram", 1 << 16)
        ram = mmap.mmap(fd, 1 << 16)
        ram[0x100:0x103] = b"abc"
        unconnected = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        apply_sandbox(SandboxLimits(address_space=8 * GIB, open_files=64))

        vmm = UnixTransport(vmm_socket, name="vmm")
        service = SharedMemoryTransport(UnixTransport(service_socket, name="service"))
        async with anyio.create_task_group() as tg:
            await tg.start(Dispatcher(router, deadline=None).serve, service)
            await share_region(vmm, 0x10_0000, fd, 1 << 16)
            code = instruction("protected", outs=True, size=1, rep=True, address_size=32, segment=None)
            frame = Vp("protected", rcx=3, rsi=0x10_0100).message(port, code, outs=True, size=1, rep=True)
            await vmm.send_batch([frame.to_bytes()])
            (reply,) = await vmm.receive_batch()
            report["completion"] = decode_completion(reply).status.name
            report["guest_wrote"] = bytes(received).decode()
            await unshare_region(vmm, 0x10_0000)
            await vmm.send_batch([frame.to_bytes()])
            (reply,) = await vmm.receive_batch()
            report["unmapped"] = decode_completion(reply).status is Status.MEMORY_ERROR
            await vmm.aclose()
        os.close(fd)

        box: list[int] = []
        thread = threading.Thread(target=box.append, args=(1,))
        thread.start()
        thread.join()
        report["thread"] = box == [1]
        report["to_thread"] = await anyio.to_thread.run_sync(sum, [1, 2]) == 3
        with mmap.mmap(-1, 1 << 20) as anonymous:
            anonymous[-1] = 1
            report["mmap"] = anonymous[-1] == 1
        caught: list[int] = []
        signal.signal(signal.SIGUSR1, lambda number, frame: caught.append(number))
        os.kill(os.getpid(), signal.SIGUSR1)
        await anyio.sleep(0)
        report["signal"] = caught == [signal.SIGUSR1]

        denied["socket"] = _errno_of(socket.socket)
        denied["execve"] = _errno_of(lambda: os.execv(sys.executable, [sys.executable, "-c", "pass"]))
        denied["open"] = _errno_of(lambda: open("/etc/hostname", "rb"))  # noqa: SIM115
        denied["fork"] = _errno_of(_fork)
        denied["connect"] = _errno_of(lambda: unconnected.connect("/nonexistent"))
        denied["ptrace"] = _errno_of(_ptrace)
        denied["raise_limit"] = _errno_of(_raise_limit)
        go.set()
        went.wait()
        report["denied"] = denied
        report["status"] = _status(status)
        report["rlimit_as"] = list(resource.getrlimit(resource.RLIMIT_AS))
        report["rlimit_nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
        try:
            bytearray(9 * GIB)
            report["over_address_space"] = "allocated"
        except MemoryError:
            report["over_address_space"] = "MemoryError"

    if backend == "uvloop":
        anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(main, backend=backend)
    return report


def child_no_seccomp() -> dict[str, Any]:
    import socket

    from transports.service.sandbox import apply_sandbox

    status = os.open("/proc/self/status", os.O_RDONLY)
    apply_sandbox(SandboxLimits(address_space=8 * GIB, open_files=64, seccomp=False))
    socket.socket().close()
    return {
        "status": _status(status),
        "rlimit_as": list(resource.getrlimit(resource.RLIMIT_AS)),
        "rlimit_nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "socket": "allowed",
    }


def child_uvloop_io_uring() -> dict[str, Any]:
    import anyio

    from transports.service.sandbox import _uses_io_uring, apply_sandbox

    report: dict[str, Any] = {}

    async def main() -> None:
        report["io_uring"] = _uses_io_uring()
        try:
            apply_sandbox(SandboxLimits())
            report["error"] = ""
        except SandboxError as error:
            report["error"] = str(error)

    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    return report


def child_drop(user: str) -> dict[str, Any]:
    from transports.service.sandbox import apply_sandbox

    apply_sandbox(SandboxLimits(user=user, seccomp=False))
    return {
        "ids": [list(os.getresuid()), list(os.getresgid()), os.getgroups()],
        "back_to_root": _errno_of(lambda: os.setuid(0)),
    }


def child_too_small() -> dict[str, Any]:
    import mmap

    from transports.service.sandbox import apply_sandbox

    reserved = mmap.mmap(-1, 256 << 20, prot=mmap.PROT_READ)  # address space in use, never touched
    try:
        apply_sandbox(SandboxLimits(address_space=64 << 20, seccomp=False))
    except SandboxError as error:
        return {"error": str(error)}
    finally:
        reserved.close()
    return {"error": ""}


if __name__ == "__main__":
    case, *arguments = sys.argv[1:]
    children: dict[str, Callable[..., dict[str, Any]]] = {
        "worker": child_worker,
        "no-seccomp": child_no_seccomp,
        "uvloop-io-uring": child_uvloop_io_uring,
        "drop": child_drop,
        "too-small": child_too_small,
    }
    result = children[case](*arguments)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # threads and loops are done; skip the interpreter's teardown
