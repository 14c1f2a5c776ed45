"""The service in a child process, driven over its UNIX socket by the client and by raw sockets."""

from __future__ import annotations

import functools
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from service_devices import BROKEN, GATE, MOST_AT_ONCE, SCRATCH, SLOW
from service_helpers import connect_raw, hello, intercept
from service_process import ServiceProcess

from dispatcher import (
    UNKNOWN_VP,
    Access,
    PortRange,
    Registers,
    Status,
    TransportClosedError,
    decode_completion,
)
from transports.service import ServiceClient, connect_service
from transports.unix import connect_unix

pytestmark = pytest.mark.anyio

connect = functools.partial(connect_service, announce_timeout=60)


def set_byte(frame: bytes, offset: int, value: int) -> bytes:
    return frame[:offset] + bytes([value]) + frame[offset + 1 :]


async def test_announces_its_ports_and_answers(socket_path: Path) -> None:
    async with connect(socket_path) as client:
        assert client.ports == [
            PortRange(SLOW, BROKEN, Access.READ_WRITE),
            PortRange(MOST_AT_ONCE, MOST_AT_ONCE, Access.READ),
            PortRange(GATE, GATE, Access.READ_WRITE),
            PortRange(SCRATCH, SCRATCH, Access.READ_WRITE),
        ]
        written = await client.exchange(intercept(SCRATCH, write=True, value=0x5A))
        assert (written.status, written.registers, written.rip) == (Status.COMPLETED, Registers.RIP, 0x1001)
        read = await client.exchange(intercept(SCRATCH, value=0x1234_5600))
        assert read.registers == Registers.RIP | Registers.RAX
        assert read.rax == 0x1234_565A  # AL replaced, the rest of RAX kept


async def test_vps_in_flight_at_once_over_one_connection(socket_path: Path) -> None:
    async with connect(socket_path) as client:
        completions = await client.exchange_many([intercept(SLOW, vp=vp) for vp in range(64)])
        most = await client.exchange(intercept(MOST_AT_ONCE))
    assert [c.vp_index for c in completions] == list(range(64))
    assert [c.rax for c in completions] == [0x40 + vp for vp in range(64)]
    # One write carried all 64, so all 64 handlers were waiting at the same time.
    assert most.rax & 0xFF == 64


async def test_a_handler_failure_is_reported_to_that_vp_only(socket_path: Path) -> None:
    async with connect(socket_path) as client:
        failed, fine = await client.exchange_many([intercept(BROKEN, vp=1), intercept(SCRATCH, vp=2)])
    assert (failed.status, failed.rax & 0xFF) == (Status.HANDLER_FAILED, 0xFF)
    assert fine.status is Status.COMPLETED


@pytest.mark.parametrize(
    ("offset", "value", "vp_readable"),
    [
        (58, 0x03, True),  # AccessSize 3
        (21, 2, True),  # InterceptAccessType execute
        (59, 17, True),  # 17 instruction bytes
        (0, 0x77, True),  # an unknown MessageType with a PayloadSize that still delimits it
        (4, 100, True),  # PayloadSize under the intercept's 128: a truncated intercept
        (4, 0, False),  # PayloadSize 0: a header alone, the VP cannot be read
    ],
)
async def test_malformed_frames_get_protocol_errors_and_the_connection_stays_usable(
    socket_path: Path, offset: int, value: int, vp_readable: bool
) -> None:
    bad = set_byte(intercept(SCRATCH, vp=7), offset, value)
    bad = bad[: 16 + bad[4]] if offset == 4 else bad
    async with connect(socket_path) as client:
        completion = await client.exchange(bad)
        assert completion.status is Status.PROTOCOL_ERROR
        assert completion.registers == Registers.NONE
        assert completion.vp_index == (7 if vp_readable else UNKNOWN_VP)
        assert completion.detail == offset  # the offset of the field at fault
        again = await client.exchange(intercept(SCRATCH, vp=7))
        assert again.status is Status.COMPLETED


async def test_an_undelimitable_header_closes_that_connection_and_no_other(
    socket_path: Path, service: ServiceProcess
) -> None:
    async with connect(socket_path) as bystander:
        raw = await connect_raw(socket_path)  # past its HELLO and the announcement
        async with raw:
            good = intercept(SCRATCH, vp=3)
            out_of_sync = set_byte(intercept(SCRATCH, vp=4), 4, 250)  # PayloadSize over 240
            await raw.send_batch([good, out_of_sync])
            received = []
            while frames := await raw.receive_batch():
                received += frames
        assert [decode_completion(frame).vp_index for frame in received] == [3]
        service.wait_for_log("out of sync")
        assert (await bystander.exchange(intercept(SCRATCH, vp=4))).status is Status.COMPLETED


async def test_a_client_killed_mid_frame_is_forgotten_and_can_reconnect(
    socket_path: Path, service: ServiceProcess
) -> None:
    half_frame = intercept(SCRATCH)[:100]
    script = (
        "import os, signal, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "s.sendall(bytes.fromhex(sys.argv[2]))\n"
        "s.recv(4096)\n"
        "s.sendall(bytes.fromhex(sys.argv[3]))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    victim = subprocess.run(
        [sys.executable, "-c", script, str(socket_path), hello().hex(), half_frame.hex()], check=False
    )
    assert victim.returncode == -signal.SIGKILL
    service.wait_for_log("in the middle of a frame; 100 bytes discarded")
    async with connect(socket_path) as client:
        assert (await client.exchange(intercept(SCRATCH))).status is Status.COMPLETED


async def test_a_hundred_clients_connect_and_leave(socket_path: Path, service: ServiceProcess) -> None:
    answered = 0

    async def polite(vp: int) -> None:
        nonlocal answered
        async with connect(socket_path) as client:
            completion = await client.exchange(intercept(SCRATCH, vp=vp))
            answered += completion.status is Status.COMPLETED

    async def rude(vp: int) -> None:
        # Leaves with an intercept in flight: the service's completion finds nobody.
        transport = await connect_raw(socket_path)
        await transport.send_batch([intercept(SLOW, vp=vp)])
        await transport.aclose()

    async with anyio.create_task_group() as tg:
        for vp in range(100):
            tg.start_soon(polite if vp % 2 else rude, vp)
    assert answered == 50

    # Every connection is gone from the service's books, and it still answers.
    seen = len(service.log)
    with anyio.fail_after(10):
        while not re.search(r"stats: .*connections 0 open, \d{3,} total", service.log[seen:]):
            service.signal(signal.SIGUSR1)
            await anyio.sleep(0.1)
    async with connect(socket_path) as client:
        assert (await client.exchange(intercept(SCRATCH))).status is Status.COMPLETED


async def test_a_vp_cannot_have_two_intercepts_in_flight(socket_path: Path) -> None:
    async with connect(socket_path) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.exchange, intercept(GATE, vp=5))
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError, match="in flight"):
            await client.exchange(intercept(SCRATCH, vp=5))
        await client.exchange(intercept(GATE, vp=6, write=True))


async def test_the_client_fails_waiters_when_the_connection_ends(socket_path: Path) -> None:
    transport = await connect_unix(socket_path)
    async with ServiceClient(transport, announce_timeout=60) as client, anyio.create_task_group() as tg:

        async def waiting_vp() -> None:
            with pytest.raises(TransportClosedError):
                await client.exchange(intercept(GATE, vp=9))

        tg.start_soon(waiting_vp)
        await anyio.wait_all_tasks_blocked()
        transport.socket.shutdown(socket.SHUT_RDWR)  # the VP waits: its exchange must not hang
    async with connect(socket_path) as other:
        await other.exchange(intercept(GATE, write=True))  # lets the service finish that read


def test_poke(socket_path: Path, tmp_path: Path) -> None:
    def poke(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "examples", "poke", "--socket", str(socket_path), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    assert poke("outb", "0x3FF", "0x5A").returncode == 0
    read = poke("inb", "0x3FF")
    assert (read.returncode, read.stdout) == (0, "0x5a\n")
    assert poke("inw", "0x3FF").stdout == "0xff5a\n"  # 0x400 is unclaimed: all ones
    failed = poke("inb", hex(BROKEN))
    assert failed.returncode == 1
    assert "HANDLER_FAILED" in failed.stderr
    ports = poke("ports")
    assert ports.stdout.split("\n") == [
        "0x0080-0x0081 rw",
        "0x0082-0x0082 r-",
        "0x0083-0x0083 rw",
        "0x03ff-0x03ff rw",
        "",
    ]
    absent = subprocess.run(
        [sys.executable, "-m", "examples", "poke", "--socket", str(tmp_path / "none.sock"), "inb", "0x80"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert absent.returncode == 3
    assert "no service at" in absent.stderr
