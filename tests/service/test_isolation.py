"""VMs are isolated from each other: devices of their own, a worker process each, limits, no code from the cwd.

Each test starts its own ``serve`` child process (the default: a
supervisor and one worker process per VM) and talks to it as VMMs of
several VMs would, one connection per VM.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from isolation_devices import COUNTER, HANG, SCRATCH
from service_helpers import HERE
from service_process import ServiceProcess

from dispatcher import Status, TransportClosedError
from dispatcher.errors import SessionRefusedError
from dispatcher.hello import HelloStatus
from dispatcher.wire import Offset
from transports.service import connect_service, io_intercept
from transports.service.control import Request, control_request

pytestmark = pytest.mark.anyio

connect = functools.partial(connect_service, announce_timeout=60)
DEVICES = ("--device", "isolation_devices:router", "--deadline", "30")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the service runs in its own process; the test's own event loop does not matter


def frame(port: int, vm: int, *, vp: int = 0, write: bool = False, value: int = 0) -> bytes:
    return io_intercept(port, 1, write=write, value=value, vp=vp, partition=vm)


async def stats(path: Path) -> Any:
    return await control_request(path, Request.STATS, timeout=60)


async def test_two_vms_do_not_share_device_state(tmp_path: Path) -> None:
    # The example PC's CMOS (the default devices): byte 0x40 written by VM 1 is VM 1's only.
    path = tmp_path / "s.sock"
    service = ServiceProcess(tmp_path, socket=path)
    try:
        async with connect(path, vm=1) as vm1, connect(path, vm=2) as vm2:
            await vm1.exchange(frame(0x70, 1, write=True, value=0x40))
            await vm1.exchange(frame(0x71, 1, write=True, value=0x5A))
            await vm2.exchange(frame(0x70, 2, write=True, value=0x40))
            assert (await vm2.exchange(frame(0x71, 2))).rax & 0xFF != 0x5A
            await vm1.exchange(frame(0x70, 1, write=True, value=0x40))
            assert (await vm1.exchange(frame(0x71, 1))).rax & 0xFF == 0x5A
        document = await stats(path)
        assert sorted(document["workers"]["pids"]) == ["1", "2"]
        assert len(set(document["workers"]["pids"].values())) == 2  # a process each
    finally:
        assert service.stop() == 0, service.log


async def test_a_frame_for_another_partition_is_refused_and_reaches_no_device(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    service = ServiceProcess(tmp_path, *DEVICES, socket=path)
    try:
        async with connect(path, vm=1) as vm1, connect(path, vm=2) as vm2:
            await vm1.exchange(frame(SCRATCH, 1, write=True, value=0x11))
            stray = await vm2.exchange(frame(SCRATCH, 1, write=True, value=0x22))  # VM 1's partition, on VM 2's
            assert (stray.status, stray.detail) == (Status.PROTOCOL_ERROR, Offset.PARTITION)
            assert (await vm1.exchange(frame(SCRATCH, 1))).rax & 0xFF == 0x11
            assert (await vm2.exchange(frame(SCRATCH, 2))).rax & 0xFF == 0
    finally:
        assert service.stop() == 0, service.log


async def test_a_killed_worker_ends_only_its_vm_and_the_next_connection_gets_a_new_one(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    service = ServiceProcess(tmp_path, *DEVICES, socket=path)
    try:
        async with connect(path, vm=2) as bystander:
            for vp in range(10):
                await bystander.exchange(frame(SCRATCH, 2, vp=vp, write=True, value=vp))
            async with connect(path, vm=1) as victim:
                await victim.exchange(frame(SCRATCH, 1, write=True, value=0x77))
                pid = (await stats(path))["workers"]["pids"]["1"]
                os.kill(pid, signal.SIGKILL)
                with pytest.raises(TransportClosedError):
                    await victim.exchange(frame(SCRATCH, 1))
            service.wait_for_log(f"VM 1: its worker (pid {pid}) killed by SIGKILL")
            for vp in range(10):
                completion = await bystander.exchange(frame(SCRATCH, 2, vp=vp))
                assert (completion.status, completion.rax & 0xFF) == (Status.COMPLETED, 9)
        document = await stats(path)
        [vm2] = [vm for vm in document["vms"] if vm["id"] == 2]
        assert (vm2["calls"], vm2["failures"]) == (20, 0)  # every intercept of the bystander, exactly
        assert (document["workers"]["failed"], document["workers"]["started"]) == (1, 2)
        async with connect(path, vm=1) as again:
            assert (await again.exchange(frame(SCRATCH, 1))).rax & 0xFF == 0  # new devices
        pids = (await stats(path))["workers"]["pids"]
        assert set(pids) == {"1", "2"} and pids["1"] != pid
    finally:
        assert service.stop() == 0, service.log


async def test_a_hung_handler_ends_its_worker_and_a_new_one_serves_the_vm(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    service = ServiceProcess(tmp_path, "--device", "isolation_devices:router", "--deadline", "0.5", socket=path)
    try:
        async with connect(path, vm=3) as vm3, connect(path, vm=4) as bystander:
            await bystander.exchange(frame(SCRATCH, 4, write=True, value=0x44))
            hung = await vm3.exchange(frame(HANG, 3))
            assert hung.status is Status.DEADLINE_EXCEEDED
            service.wait_for_log("VM 3: its worker")
            assert (await bystander.exchange(frame(SCRATCH, 4))).rax & 0xFF == 0x44
        assert "exited after a handler hung (status 3)" in service.log
        async with connect(path, vm=3) as again:
            assert (await again.exchange(frame(SCRATCH, 3))).status is Status.COMPLETED
        assert (await stats(path))["workers"]["hung"] == 1
    finally:
        assert service.stop() == 0, service.log


async def test_sigterm_with_a_hung_worker_returns_after_the_grace_period(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    service = ServiceProcess(
        tmp_path, "--device", "isolation_devices:router", "--deadline", "0", "--grace", "1", socket=path
    )
    async with connect(path, vm=5) as vm5, anyio.create_task_group() as tg:

        async def stuck_vp() -> None:
            with pytest.raises(TransportClosedError):
                await vm5.exchange(frame(HANG, 5))  # no deadline: the handler blocks its worker for good

        tg.start_soon(stuck_vp)
        await anyio.wait_all_tasks_blocked()
        service.signal(signal.SIGTERM)
    assert service.wait() == 0, service.log
    assert "VM 5: its worker" in service.log and "did not stop within the 1 s grace period; killing it" in service.log


async def test_limits_refuse_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    service = ServiceProcess(tmp_path, *DEVICES, "--max-connections-per-uid", "2", "--max-vms", "1", socket=path)
    try:
        async with connect(path, vm=1):
            with pytest.raises(SessionRefusedError, match=r"serves 1 VMs, its most \(--max-vms\)"):
                async with connect(path, vm=2):
                    pass
            async with connect(path, vm=1):
                with pytest.raises(SessionRefusedError, match=r"--max-connections-per-uid") as refused:
                    async with connect(path, vm=1):
                        pass
                assert refused.value.status == HelloStatus.REFUSED
        document = await stats(path)
        assert document["connections"]["refused"] == 2 and document["connections"]["total"] == 2
    finally:
        assert service.stop() == 0, service.log


def test_a_shared_device_needs_in_process(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples", "serve", "--device-path", str(HERE), "--device",
         "isolation_devices:counter", "--socket", str(tmp_path / "s.sock")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        "intercept-dispatch serve: error: cannot load the devices: device 'isolation_devices:counter' is marked "
        "shared across VMs; only `serve --in-process` can serve it (each VM has a worker process of its own "
        "otherwise)\n"
    )


async def test_in_process_vms_have_their_own_devices_except_shared_ones(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    service = ServiceProcess(tmp_path, "--in-process", *DEVICES, "--device", "isolation_devices:counter", socket=path)
    try:
        assert "in this process (unisolated)" in service.log
        async with connect(path, vm=1) as vm1, connect(path, vm=2) as vm2:
            await vm1.exchange(frame(SCRATCH, 1, write=True, value=0x33))
            assert (await vm2.exchange(frame(SCRATCH, 2))).rax & 0xFF == 0
            counts = [(await vm.exchange(frame(COUNTER, n))).rax & 0xFF for vm, n in ((vm1, 1), (vm2, 2), (vm1, 1))]
            assert counts == [0, 1, 2]  # one counter, marked shared
    finally:
        assert service.stop() == 0, service.log


async def test_no_code_from_the_working_directory(tmp_path: Path) -> None:
    # A working directory holding an examples/ package and a device module, as an attacker might plant them.
    planted = tmp_path / "cwd"
    marker = tmp_path / "planted code ran"
    (planted / "examples").mkdir(parents=True)
    code = f"open({str(marker)!r}, 'w').close()\n"
    (planted / "examples" / "__init__.py").write_text(code)
    (planted / "examples" / "cli.py").write_text(code)
    (planted / "planted_devices.py").write_text(code + "from dispatcher import Router\nrouter = Router\n")
    script = Path(sys.executable).parent / "intercept-dispatch"
    serve = [str(script), "serve"] if script.exists() else [sys.executable, "-P", "-m", "examples", "serve"]
    path = tmp_path / "s.sock"
    log = tmp_path / "service.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen([*serve, "--socket", str(path)], cwd=planted, stderr=stderr)
    try:
        deadline = anyio.current_time() + 60
        while "serving on" not in log.read_text():
            assert process.poll() is None and anyio.current_time() < deadline, log.read_text()
            await anyio.sleep(0.05)
        async with connect(path, vm=1) as vm1:  # the example PC: its worker loads examples.cli
            assert (await vm1.exchange(frame(0x61, 1))).status is Status.COMPLETED
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
    named = subprocess.run(
        [*serve, "--device", "planted_devices:router", "--socket", str(tmp_path / "t.sock")],
        cwd=planted, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert named.returncode == 1 and "cannot import 'planted_devices'" in named.stderr, named.stderr
    assert not marker.exists()
