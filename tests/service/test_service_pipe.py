"""The service on stdin/stdout, spawned by its VMM as a child process."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from service_devices import BROKEN, GATE, MOST_AT_ONCE, SCRATCH, SLOW
from service_helpers import HERE, SERVE_ARGS, hello, intercept
from service_process import serve_command

from dispatcher import Status, decode_announcement, decode_completion
from transports.pipe import PipeTransport
from transports.service import spawn_service

pytestmark = pytest.mark.anyio


async def test_a_spawned_service_answers_on_its_pipes(anyio_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(HERE)
    command = serve_command(*SERVE_ARGS, "--stdio", backend=anyio_backend)
    async with spawn_service(command, announce_timeout=60) as client:
        assert [r.first for r in client.ports] == [SLOW, MOST_AT_ONCE, GATE, SCRATCH]
        await client.exchange(intercept(SCRATCH, write=True, value=0x66))
        completions = await client.exchange_many([intercept(SCRATCH, vp=1), intercept(BROKEN, vp=2)])
        assert [(c.status, c.rax & 0xFF) for c in completions] == [
            (Status.COMPLETED, 0x66),
            (Status.HANDLER_FAILED, 0xFF),
        ]
        malformed = intercept(SCRATCH, vp=3)
        malformed = malformed[:58] + b"\x07" + malformed[59:]  # AccessSize 7
        assert (await client.exchange(malformed)).status is Status.PROTOCOL_ERROR
        slow = await client.exchange_many([intercept(SLOW, vp=vp) for vp in range(16)])
        assert [c.rax for c in slow] == [0x40 + vp for vp in range(16)]


@pytest.mark.parametrize("anyio_backend", ["trio"])  # the socket tests stop both backends with SIGTERM
async def test_sigint_on_stdio_finishes_in_flight_intercepts_and_exits_0(anyio_backend: str, tmp_path: Path) -> None:
    to_service, service_in = os.pipe()
    service_out, from_service = os.pipe()
    with open(tmp_path / "log", "wb") as log:
        process = subprocess.Popen(
            serve_command(*SERVE_ARGS, "--stdio", backend=anyio_backend),
            cwd=HERE,
            stdin=to_service,
            stdout=from_service,
            stderr=log,
        )
    os.close(to_service)
    os.close(from_service)
    try:
        async with PipeTransport(service_out, service_in) as transport:
            await transport.send_batch([hello()])
            opening = await transport.receive_batch()  # the HELLO_REPLY and the announcement
            while not decode_announcement(opening[-1])[1]:
                opening += await transport.receive_batch()
            await transport.send_batch([intercept(SLOW, vp=vp) for vp in range(8)])
            process.send_signal(signal.SIGINT)
            completions = []
            while frames := await transport.receive_batch():
                completions += [decode_completion(frame) for frame in frames]
        assert sorted(c.vp_index for c in completions) == list(range(8))
        assert {c.status for c in completions} == {Status.COMPLETED}
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "SIGINT: stopping" in (tmp_path / "log").read_text()
