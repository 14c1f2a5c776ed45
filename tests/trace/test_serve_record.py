"""``serve --record FILE``: each VM's traffic in a trace file of its own, in a worker process or in process."""

from __future__ import annotations

from pathlib import Path

import pytest
from service_process import ServiceProcess

from dispatcher import Status, decode_completion, decode_message
from dispatcher.replay import format_divergence, replay
from dispatcher.trace import read_trace
from dispatcher.trace_records import Completion, Intercept, IrqEdge
from examples.cli import pc_router
from transports.service import connect_service, io_intercept
from transports.service.config import record_path

pytestmark = pytest.mark.anyio

HERE = Path(__file__).parent  # where trace_devices.py is: the service's --device-path
SCRATCH, HANG = 0x510, 0x511  # trace_devices' register, and its port whose handler never returns
COM1_IER, COM1_IIR, COM1_MCR = 0x3F9, 0x3FA, 0x3FC


def access(port: int, vm: int, *, write: bool = False, value: int = 0) -> bytes:
    return io_intercept(port, 1, write=write, value=value, partition=vm, rip=0x1000)


@pytest.mark.parametrize(("isolation", "name"), [("worker", "run.trace.gz"), ("in-process", "run.trace")])
async def test_each_vm_records_to_its_own_file(tmp_path: Path, anyio_backend: str, isolation: str, name: str) -> None:
    base = tmp_path / name  # compressed in a sandboxed worker too
    Path(record_path(str(base), 3)).write_bytes(b"an earlier run's: kept")
    extra = ("--in-process",) if isolation == "in-process" else ()
    service = ServiceProcess(
        tmp_path, "--device", "trace_devices:router", "--record", str(base), *extra, socket=tmp_path / "s.sock",
        backend=anyio_backend, cwd=HERE,
    )  # fmt: skip
    try:
        for vm in (3, 4):
            async with connect_service(tmp_path / "s.sock", vm=vm, announce_timeout=60) as client:
                await client.exchange(access(SCRATCH, vm, write=True, value=0x40 + vm))
                assert (await client.exchange(access(SCRATCH, vm))).rax & 0xFF == 0x40 + vm
    finally:
        assert service.stop() == 0, service.log

    assert Path(record_path(str(base), 3)).read_bytes() == b"an earlier run's: kept"  # never overwritten
    for vm, path in ((3, record_path(str(base), 3, 1)), (4, record_path(str(base), 4))):
        assert f"VM {vm}: recording to {path}" in service.log
        trace = read_trace(path)
        assert trace.complete, path
        assert (Path(path).read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
        metadata = trace.metadata
        assert (metadata["source"], metadata["partition"], metadata["clock"]) == ("serve", vm, "real")
        assert (metadata["machine"], metadata["devices"]) == ("trace_devices:router", ["trace_devices:router"])
        assert [type(e) for e in trace.events] == [Intercept, Completion, Intercept, Completion]
        intercepts = [decode_message(e.frame) for e in trace.events if isinstance(e, Intercept)]
        assert [(m.port_number, m.is_write) for m in intercepts] == [(SCRATCH, True), (SCRATCH, False)]
        completions = [decode_completion(e.frame) for e in trace.events if isinstance(e, Completion)]
        assert completions[1].rax & 0xFF == 0x40 + vm


async def test_a_worker_whose_handler_hangs_writes_its_trace_first(tmp_path: Path, anyio_backend: str) -> None:
    base = tmp_path / "hang.trace"
    service = ServiceProcess(
        tmp_path, "--device", "trace_devices:router", "--record", str(base), "--deadline", "0.5",
        socket=tmp_path / "s.sock", backend=anyio_backend, cwd=HERE,
    )  # fmt: skip
    try:
        async with connect_service(tmp_path / "s.sock", vm=1, announce_timeout=60) as client:
            await client.exchange(access(SCRATCH, 1, write=True, value=7))
            assert (await client.exchange(access(HANG, 1))).status == Status.DEADLINE_EXCEEDED
        service.wait_for_log("this worker exits")
    finally:
        assert service.stop() == 0, service.log

    trace = read_trace(record_path(str(base), 1))
    assert not trace.complete  # the worker exited at once: no end record, but nothing lost
    kinds = [(type(e), decode_message(e.frame).port_number if isinstance(e, Intercept) else None) for e in trace.events]
    assert kinds == [(Intercept, SCRATCH), (Completion, None), (Intercept, HANG), (Completion, None)]
    last = trace.events[-1]
    assert isinstance(last, Completion) and decode_completion(last.frame).status == Status.DEADLINE_EXCEEDED


async def test_the_devices_interrupt_edges_are_recorded_and_replayed(tmp_path: Path, anyio_backend: str) -> None:
    # The default devices (the example PC): with OUT2 set (the PC's gate for the UART's interrupt), enabling
    # COM1's transmitter-empty interrupt raises IRQ 4 at once.
    base = tmp_path / "pc.trace"
    service = ServiceProcess(
        tmp_path, "--record", str(base), socket=tmp_path / "s.sock", backend=anyio_backend, cwd=HERE
    )  # fmt: skip
    try:
        async with connect_service(tmp_path / "s.sock", vm=2, announce_timeout=60) as client:
            await client.exchange(access(COM1_MCR, 2, write=True, value=0x08))
            await client.exchange(access(COM1_IER, 2, write=True, value=0x02))
            assert (await client.exchange(access(COM1_IIR, 2))).rax & 0x0F == 0x02  # THR empty is pending
    finally:
        assert service.stop() == 0, service.log

    trace = read_trace(record_path(str(base), 2))
    assert trace.metadata["machine"] == "examples.cli:pc_router"
    edges = [(e.line, e.level) for e in trace.events if isinstance(e, IrqEdge)]
    assert edges == [(4, True), (4, False)]  # reading IIR with THR empty as its cause clears it
    result = replay(trace.events, pc_router())
    assert result.ok and result.irqs_compared, [format_divergence(d) for d in result.differences]


def test_record_needs_a_directory_that_exists(tmp_path: Path) -> None:
    service = ServiceProcess(
        tmp_path, "--device", "trace_devices:router", "--record", str(tmp_path / "absent" / "run.trace"),
        socket=tmp_path / "s.sock", cwd=HERE, ready=False,
    )  # fmt: skip
    assert service.wait() == 2
    lines = service.log.strip().splitlines()
    assert len(lines) == 1 and "--record" in lines[0] and "does not exist" in lines[0], service.log
