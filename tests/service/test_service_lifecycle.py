"""Starting and stopping the service: signals, the socket file, who may connect, systemd."""

from __future__ import annotations

import functools
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from service_devices import GATE, SCRATCH, SLOW
from service_helpers import HERE, SERVE_ARGS, connect_raw, intercept
from service_process import ServiceProcess, serve_command

from dispatcher import Status, TransportClosedError, decode_completion
from transports.service import connect_service

connect = functools.partial(connect_service, announce_timeout=60)

pytestmark = pytest.mark.anyio


async def test_sigterm_finishes_the_intercepts_in_flight(tmp_path: Path, anyio_backend: str) -> None:
    service = ServiceProcess(tmp_path, *SERVE_ARGS, socket=tmp_path / "s.sock", backend=anyio_backend)
    transport = await connect_raw(tmp_path / "s.sock")  # past the announcement: the VM's worker serves it
    async with transport:
        await transport.send_batch([intercept(SLOW, vp=vp) for vp in range(32)])
        # Every frame is in the service's socket buffer now; none has had time to complete.
        service.signal(signal.SIGTERM)
        completions = []
        while frames := await transport.receive_batch():
            completions += [decode_completion(frame) for frame in frames]
    assert sorted(c.vp_index for c in completions) == list(range(32))
    assert {c.status for c in completions} == {Status.COMPLETED}
    assert service.wait() == 0, service.log
    assert "SIGTERM: stopping" in service.log
    assert not (tmp_path / "s.sock").exists()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_stuck_handler_is_cut_off_after_the_grace_period(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path, *SERVE_ARGS, "--grace", "0.2", socket=tmp_path / "s.sock")
    async with connect(tmp_path / "s.sock") as client, anyio.create_task_group() as tg:

        async def stuck_vp() -> None:
            with pytest.raises(TransportClosedError):
                await client.exchange(intercept(GATE))  # nobody opens the gate

        tg.start_soon(stuck_vp)
        await anyio.wait_all_tasks_blocked()
        service.signal(signal.SIGTERM)
    assert service.wait() == 0
    assert "closed with intercepts unanswered after the 0.2 s grace period" in service.log


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path, *SERVE_ARGS, socket=tmp_path / "s.sock")
    async with connect(tmp_path / "s.sock") as client, anyio.create_task_group() as tg:

        async def stuck_vp() -> None:
            with pytest.raises(TransportClosedError):
                await client.exchange(intercept(GATE))

        tg.start_soon(stuck_vp)
        await anyio.wait_all_tasks_blocked()
        service.signal(signal.SIGINT)
        service.wait_for_log("SIGINT: stopping")
        service.signal(signal.SIGINT)
    assert service.wait() == 1
    assert "SIGINT again: exiting without waiting" in service.log


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the checks run before any event-loop code differs
async def test_the_socket_file_is_private_and_other_users_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    service = ServiceProcess(tmp_path, *SERVE_ARGS, "--allow-uid", str(os.getuid() + 1), socket=path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        # Closed at once, before anything of the connection is read.
        with pytest.raises(TransportClosedError, match=r"gone|closed"):
            async with connect(path):
                pass
        service.wait_for_log(f"refused, uid {os.getuid()} is not allowed")
        if os.getuid() == 0:
            # Root passes any file permission; another user must not get through 0600.
            script = "import os, socket, sys; os.setuid(65534); socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
            other = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True)
            assert other.returncode != 0 and "PermissionError" in other.stderr
    finally:
        assert service.stop() == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_stale_socket_is_replaced_and_a_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))  # a socket file nobody listens on: what a killed service leaves
    dead.close()
    uid = str(os.getuid())
    first = ServiceProcess(tmp_path, *SERVE_ARGS, "--allow-uid", uid, "--mode", "0660", socket=path)
    try:
        assert "replaced the stale socket" in first.log
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        second = ServiceProcess(tmp_path, *SERVE_ARGS, socket=path, ready=False)
        assert second.wait() == 1
        assert "another service is listening there" in second.log
        async with connect(path) as client:  # the first still serves, and this uid is allowed
            assert (await client.exchange(intercept(SCRATCH))).status is Status.COMPLETED
    finally:
        assert first.stop() == 0
    assert not path.exists()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_systemd_socket_activation_and_notification(tmp_path: Path) -> None:
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "activated.sock"))
    listening.listen()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    # As systemd does: the socket as descriptor 3, LISTEN_PID naming the service itself.
    launcher = (
        "import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.executable, sys.argv[2:])\n"
    )
    command = [sys.executable, "-c", launcher, str(listening.fileno()), *serve_command(*SERVE_ARGS)]
    environment = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    with open(tmp_path / "log", "wb") as log:
        process = subprocess.Popen(command, cwd=HERE, pass_fds=[listening.fileno()], env=environment, stderr=log)
    listening.close()
    try:
        assert notify.recv(64) == b"READY=1"
        async with connect(tmp_path / "activated.sock") as client:
            assert (await client.exchange(intercept(SCRATCH))).status is Status.COMPLETED
        process.send_signal(signal.SIGTERM)
        assert notify.recv(64) == b"STOPPING=1"
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        notify.close()
    # The socket belongs to systemd: the service must not remove it.
    assert (tmp_path / "activated.sock").exists()
