"""``stats`` and ``inspect`` against a running service, its metrics endpoint, and what its log says.

Each test talks to a ``serve`` child process; the commands run as
``python -m transports.service.stats_command`` / ``inspect_command``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from service_devices import BROKEN, SCRATCH
from service_helpers import SERVE_ARGS
from service_process import ServiceProcess

from dispatcher.wire import frame_ids
from transports.service import connect_service, io_intercept

pytestmark = pytest.mark.anyio

connect = functools.partial(connect_service, announce_timeout=60)
ANSWERED, REFUSED, USAGE, UNREACHABLE = 0, 1, 2, 3


def command(name: str, socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"transports.service.{name}_command", "--socket", str(socket_path), "--timeout", "60",
         *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip


def stats_json(socket_path: Path, *args: str) -> Any:
    result = command("stats", socket_path, "--json", *args)
    assert result.returncode == ANSWERED, result.stderr
    return json.loads(result.stdout)


async def send(socket_path: Path, frames: list[bytes]) -> None:
    """Each VM's frames over a connection of that VM (a connection carries one VM's frames)."""
    vms = sorted({frame_ids(frame)[0] for frame in frames})
    for vm in vms:
        async with connect(socket_path, vm=vm) as client:
            await client.exchange_many([frame for frame in frames if frame_ids(frame)[0] == vm])


def scratch(partition: int, vp: int = 0, *, write: bool = False, port: int = SCRATCH) -> bytes:
    return io_intercept(port, 1, write=write, value=0x5A, vp=vp, partition=partition)


async def test_stats_counts_per_device_and_per_vm(socket_path: Path) -> None:
    await send(socket_path, [scratch(501, vp, write=True) for vp in range(3)] + [scratch(502)])
    document = stats_json(socket_path)
    vms = {vm["id"]: vm for vm in document["vms"]}
    assert [(d["name"], d["ports"], d["calls"]) for d in vms[501]["devices"]] == [
        ("router.scratch_register", "0x3ff rw", 3)
    ]
    assert vms[502]["calls"] == 1 and vms[501]["failures"] == 0
    assert document["intercepts"]["received"] >= 4 and document["service"]["pid"] > 0
    only = stats_json(socket_path, "--vm", "502")
    assert [vm["id"] for vm in only["vms"]] == [502]


async def test_stats_as_text(socket_path: Path) -> None:
    await send(socket_path, [scratch(503)])
    result = command("stats", socket_path)
    assert result.returncode == ANSWERED, result.stderr
    text = result.stdout
    assert text.startswith("service pid ") and "intercepts " in text
    section = text.partition("VM 503: 1 calls, 0 failed\n")[2]
    assert re.match(r"\s+DEVICE\s+PORTS\s+CALLS\s+FAILED\s+TIMED", section), text
    assert re.search(r"router\.scratch_register\s+0x3ff rw\s+1\s+0\s+1\s", section), text


async def test_inspect_lists_the_devices_with_that_vms_calls(socket_path: Path) -> None:
    await send(socket_path, [scratch(504), scratch(504, 1)])
    result = command("inspect", socket_path, "--vm", "504")
    assert result.returncode == ANSWERED, result.stderr
    assert "devices (VM 504's; each VM has devices of its own)" in result.stdout
    assert "router.scratch_register (function): 2 calls\n  0x3ff rw" in result.stdout
    document = json.loads(command("inspect", socket_path, "--vm", "504", "--json").stdout)
    [device] = [d for d in document["devices"] if d["name"] == "router.scratch_register"]
    assert device["calls"] == 2 and device["handlers"] == [{"name": "router.scratch_register", "ports": "0x3ff rw",
                                                           "calls": 2}]  # fmt: skip


async def test_a_vm_that_sent_nothing_is_refused_in_one_line(socket_path: Path) -> None:
    for name in ("inspect", "stats"):
        result = command(name, socket_path, "--vm", "0x7777777")
        assert result.returncode == REFUSED
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith(f"intercept-dispatch {name}: error: VM 125269879 is not served")


def test_no_service_there_is_one_line_and_status_3(tmp_path: Path) -> None:
    result = command("stats", tmp_path / "absent.sock")
    assert result.returncode == UNREACHABLE
    assert result.stderr == (
        f"intercept-dispatch stats: error: no service at {tmp_path / 'absent.sock'}: there is no such file "
        f"(start a service there with: intercept-dispatch serve --socket {tmp_path / 'absent.sock'})\n"
    )


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--vm", "-1"], "argument --vm: -1 is outside 0..0xffffffffffffffff"),
        (["--vm", "vm1"], "argument --vm: 'vm1' is not a VM id"),
        (["--timeout", "0"], "argument --timeout: 0 is out of range"),
    ],
)
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], why: str) -> None:
    result = command("inspect", tmp_path / "s.sock", *args)
    assert result.returncode == USAGE
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"intercept-dispatch inspect: error: {why}")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_inspect_shows_device_registers_of_the_example_pc(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path, socket=tmp_path / "pc.sock")
    try:
        await send(tmp_path / "pc.sock", [scratch(9, write=True)])  # the UART's scratch register
        result = command("inspect", tmp_path / "pc.sock", "--vm", "9")
        assert result.returncode == ANSWERED, result.stderr
        uart = result.stdout.partition("\nUart16550 (examples.uart.Uart16550): 1 call\n")[2].partition("\n\n")[0]
        assert re.search(r"^    scr\s+0x5a$", uart, re.MULTILINE), result.stdout
        assert re.search(r"^    io_base\s+0x3f8$", uart, re.MULTILINE), result.stdout
    finally:
        assert service.stop() == 0, service.log


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_refused_user_gets_no_answer(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    service = ServiceProcess(tmp_path, *SERVE_ARGS, "--allow-uid", str(os.getuid() + 1), socket=path)
    try:
        result = command("stats", path)
        assert result.returncode == UNREACHABLE
        assert "closed the connection without answering (is this user allowed to connect?" in result.stderr
    finally:
        assert service.stop() == 0, service.log


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_the_metrics_endpoint_speaks_prometheus(tmp_path: Path, anyio_backend: str) -> None:
    pytest.importorskip("prometheus_client", reason="the metrics endpoint needs the [metrics] extra")
    path = tmp_path / "s.sock"
    service = ServiceProcess(tmp_path, *SERVE_ARGS, "--metrics-port", "0", socket=path, backend=anyio_backend)
    try:
        found = re.search(r"metrics at (http://127\.0\.0\.1:\d+/metrics)", service.log)
        assert found, service.log
        await send(path, [scratch(7), scratch(7, 1, port=BROKEN)])
        status, text = http_get(found.group(1))
        assert status == 200
        labels = 'device="router.scratch_register",ports="0x3ff rw",vm="7"'
        assert f"intercept_dispatch_handler_calls_total{{{labels}}} 1.0" in text
        broken = 'device="router.broken_register",ports="0x81 rw",vm="7"'
        assert f"intercept_dispatch_handler_failures_total{{{broken}}} 1.0" in text
        assert f"intercept_dispatch_handler_latency_seconds_count{{{labels}}} 1.0" in text
        assert 'intercept_dispatch_intercept_errors_total{kind="handler"} 1.0' in text
        assert "process_open_fds" in text
        assert http_get(found.group(1).removesuffix("metrics") + "other")[0] == 404
    finally:
        assert service.stop() == 0, service.log


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_connections_are_logged_at_debug_and_failures_are_summarized(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    service = ServiceProcess(tmp_path, *SERVE_ARGS, "-v", socket=path)
    try:
        await send(path, [scratch(0, vp, port=BROKEN) for vp in range(20)])
    finally:
        assert service.stop() == 0, service.log
    log = service.log
    # The supervisor accepts the connection; VM 0's worker (its lines start "VM 0: ") serves it.
    connected = r"DEBUG intercept_dispatch\.service: connection 1 \(pid \d+, uid \d+\): connected, VM 0\n"
    assert re.search(connected, log), log
    closed = r"DEBUG intercept_dispatch\.service: VM 0: connection 1 \(pid \d+, uid \d+\): closed\n"
    assert re.search(closed, log), log
    # A few failures of the same handler on the same port are logged in full, then one line sums up the rest.
    failed = re.findall(
        r"ERROR intercept_dispatch\.engine: VM 0: handler failed on port 0x81 .*?, VP (\d+)(?:: (\d+) more)?", log
    )
    shown = [vp for vp, more in failed if not more]
    summarized = sum(int(more) for _, more in failed if more)
    assert len(shown) + summarized == 20 and summarized > 0, log
    assert re.search(r"VP \d+: \d+ more like this in the last 10 s\n", log), log
    assert log.count("Traceback") == len(shown)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_default_log_has_no_line_per_connection_and_quiet_has_no_info(tmp_path: Path) -> None:
    default = ServiceProcess(tmp_path, *SERVE_ARGS, socket=tmp_path / "a.sock")
    try:
        await send(tmp_path / "a.sock", [scratch(0)])
    finally:
        assert default.stop() == 0, default.log
    assert "serving on" in default.log and ": connected" not in default.log and ": closed" not in default.log
    quiet = ServiceProcess(tmp_path, *SERVE_ARGS, "-q", socket=tmp_path / "q.sock", ready=False)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "q.sock").exists():  # no "serving on" to wait for: -q leaves INFO out
            assert quiet.process.poll() is None and time.monotonic() < deadline, quiet.log
            time.sleep(0.02)
        await send(tmp_path / "q.sock", [scratch(0, port=BROKEN)])
    finally:
        assert quiet.stop() == 0, quiet.log
    assert (
        " INFO " not in quiet.log and "ERROR intercept_dispatch.engine: VM 0: handler failed on port 0x81" in quiet.log
    )
