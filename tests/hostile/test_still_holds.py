"""What the defences must not break: many VMs at once, connections that come and go, clients killed
mid-frame, and a stop with work in flight, each completion counted exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hostile_client import (
    Background,
    Closed,
    VmClient,
    bystander,
    descendants,
    fd_count,
    hello_frame,
    intercept,
    open_raw,
    wait_until,
    worker_deaths,
)
from hostile_devices import SCRATCH, SLOW
from service_process import ServiceProcess

from dispatcher import Status

HERE = Path(__file__).parent
Serve = Callable[..., ServiceProcess]


def socket_of(service: ServiceProcess) -> Path:
    assert service.socket is not None
    return service.socket


def test_many_vms_and_connections_at_once(serve: Serve) -> None:
    service = serve()
    path = socket_of(service)
    # Four VMs, two connections each, every connection eight VPs in flight at once.
    runs = [Background(bystander, path, vm, rounds=10, tag=i, first_vp=8 * i) for i in range(2) for vm in range(10, 14)]
    for run in runs:
        tally = run.result()
        assert tally.sent == tally.completed == 160, tally
    assert service.stop() == 0, service.log
    assert worker_deaths(service.log) == [], service.log


def test_connections_that_come_and_go_leave_nothing_behind(serve: Serve) -> None:
    service = serve()
    path = socket_of(service)
    tally = bystander(path, 20, rounds=2)
    assert tally.completed == 32
    baseline = fd_count(descendants(service.process.pid))
    for cycle in range(60):
        vm = 20 + cycle % 3
        if cycle % 3 == 0:  # gone before reading the reply
            sock = open_raw(path)
            sock.sendall(hello_frame(vm))
            sock.close()
        elif cycle % 3 == 1:  # gone in the middle of its HELLO
            sock = open_raw(path)
            sock.sendall(hello_frame(vm)[:10])
            sock.close()
        else:
            with VmClient(path, vm) as client:
                assert client.exchange(intercept(SCRATCH, vm=vm, vp=cycle)).status is Status.COMPLETED
    tally = bystander(path, 20, tag=1)
    assert tally.sent == tally.completed == 320, tally
    wait_until(lambda: fd_count(descendants(service.process.pid)) <= baseline + 8, what="descriptors back to baseline")
    assert service.stop() == 0, service.log
    assert worker_deaths(service.log) == [], service.log


KILLED_MID_FRAME = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.sendall(bytes.fromhex(sys.argv[2]))
def frame():
    head = sock.recv(16, socket.MSG_WAITALL)
    return head + sock.recv(head[4], socket.MSG_WAITALL)
frame()  # HELLO_REPLY
while not frame()[17] & 1:  # the port announcement, up to its FINAL frame
    pass
sock.sendall(bytes.fromhex(sys.argv[3]))
print("sent", flush=True)
sys.stdin.read()  # until killed
"""


def test_clients_killed_mid_frame(serve: Serve) -> None:
    service = serve()
    path = socket_of(service)
    for vm in (30, 31):  # both workers exist before the baseline
        assert bystander(path, vm, rounds=1).completed == 16
    baseline = fd_count(descendants(service.process.pid))
    for number in range(4):
        vm = 30 + number % 2
        # In session: one whole intercept and half of the next one, then SIGKILL.
        data = intercept(SCRATCH, vm=vm, write=True, value=number) + intercept(SCRATCH, vm=vm)[:70]
        child = subprocess.Popen(
            [sys.executable, "-c", KILLED_MID_FRAME, str(path), hello_frame(vm).hex(), data.hex()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert child.stdout is not None and child.stdin is not None
        try:
            assert child.stdout.readline() == b"sent\n"
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            child.stdin.close()
            child.stdout.close()
        # The whole intercept was served (PROTOCOL.md: the partial frame is discarded, what arrived whole is not).
        with VmClient(path, vm) as client:
            completion = client.exchange(intercept(SCRATCH, vm=vm, vp=1))
            assert completion.status is Status.COMPLETED and completion.rax & 0xFF == number, completion
    tally = bystander(path, 30, tag=1)
    assert tally.sent == tally.completed == 320, tally
    wait_until(lambda: fd_count(descendants(service.process.pid)) <= baseline + 8, what="descriptors back to baseline")
    assert service.stop() == 0, service.log
    assert worker_deaths(service.log) == [], service.log


def test_a_stop_answers_the_work_in_flight(serve: Serve) -> None:
    service = serve()
    path = socket_of(service)
    clients = [VmClient(path, vm) for vm in (40, 41, 42)]
    try:
        for client in clients:
            client.send(
                [*(intercept(SLOW, vm=client.vm, vp=vp) for vp in range(16)), intercept(SCRATCH, vm=client.vm, vp=99)]
            )
        # Sent before the stop: every one of them must be answered.
        service.signal(signal.SIGTERM)
        for client in clients:
            completions = client.completions(17)
            assert sorted(c.vp_index for c in completions) == [*range(16), 99]
            assert all(c.status is Status.COMPLETED and c.source_partition == client.vm for c in completions)
            try:
                extra = client.read_frame()
            except (Closed, ConnectionResetError):
                extra = b""
            assert extra == b"", f"VM {client.vm}: a frame after the last completion: {extra!r}"
    finally:
        for client in clients:
            client.close()
    assert service.wait() == 0, service.log
    assert worker_deaths(service.log) == [], service.log
