"""The memfd path end to end: ``python -m examples serve`` in a subprocess, guest memory shared over its socket."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
from service_process import ServiceProcess
from string_devices import BYTES, FIFO
from string_driver import Vp, instruction

from dispatcher import Registers, Status
from transports.service import ServiceClient, connect_service
from transports.shared_memory import memfd_for_sharing, share_region
from transports.unix import UnixTransport

pytestmark = pytest.mark.anyio

HERE = Path(__file__).parent
RAM = 0x10_0000  # where the memfd sits in guest-physical memory
SIZE = 0x2_0000


def rep_frame(*, outs: bool, size: int, port: int, rcx: int, index: int) -> bytes:
    code = instruction("protected", outs=outs, size=size, rep=True, address_size=32, segment=None)
    return Vp("protected", rcx=rcx, rsi=index, rdi=index).message(port, code, outs=outs, size=size, rep=True).to_bytes()


async def run_to_end(client: ServiceClient, *, outs: bool, size: int, port: int, count: int, index: int) -> None:
    """Execute one REP instruction through the service, re-entering it after each chunk as a VMM does."""
    rcx = count
    for _ in range(1000):
        completion = await client.exchange(rep_frame(outs=outs, size=size, port=port, rcx=rcx, index=index))
        assert completion.status is Status.COMPLETED, completion
        rcx = completion.rcx
        index = completion.rsi if outs else completion.rdi
        if completion.registers & Registers.RIP:
            assert rcx == 0
            return
    raise AssertionError("the instruction never finished")


async def test_string_io_through_serve_with_a_shared_memfd(tmp_path: Path, anyio_backend: str) -> None:
    socket_path = tmp_path / "s.sock"
    service = ServiceProcess(tmp_path, "--device", "string_devices:router", "--deadline", "30", socket=socket_path,
                             backend=anyio_backend, cwd=HERE)  # fmt: skip
    fd = memfd_for_sharing("guest-ram", SIZE)
    try:
        with mmap.mmap(fd, SIZE) as ram:
            message = bytes(range(256)) * 12  # 3 KiB: more than one 1024-element chunk of bytes
            ram[0x1000 : 0x1000 + len(message)] = message
            async with connect_service(socket_path) as client:
                assert isinstance(client.transport, UnixTransport)
                await share_region(client.transport, RAM, fd, SIZE)
                # REP OUTSB into the bulk FIFO, then REP INSW back out of it into another page.
                await run_to_end(client, outs=True, size=1, port=FIFO, count=len(message), index=RAM + 0x1000)
                await run_to_end(client, outs=False, size=2, port=FIFO, count=len(message) // 2, index=RAM + 0x8000)
                assert ram[0x8000 : 0x8000 + len(message)] == message
                # The same through a port without a bulk handler: one call per element.
                await run_to_end(client, outs=True, size=1, port=BYTES, count=300, index=RAM + 0x1000)
                await run_to_end(client, outs=False, size=1, port=BYTES, count=300, index=RAM + 0x9000)
                assert ram[0x9000 : 0x9000 + 300] == message[:300]
                # Outside the shared region: a memory error, nothing touched.
                completion = await client.exchange(rep_frame(outs=False, size=1, port=BYTES, rcx=1, index=RAM + SIZE))
                assert completion.status is Status.MEMORY_ERROR and completion.registers == Registers.NONE
    finally:
        os.close(fd)
        assert service.stop() == 0, service.log
