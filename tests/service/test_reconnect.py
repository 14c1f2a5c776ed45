"""A VMM client that reconnects by itself: the service restarts under it (SIGTERM, a new process with the same
``--state-dir``), and the intercept it had not answered is sent again and answered from the restored state."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from service_process import ServiceProcess

from dispatcher import Status, TransportClosedError
from transports.service import connect_service
from transports.service.client import InterceptLostError, Reconnect, ServiceClient, io_intercept

pytest.importorskip("dispatcher.device_state", reason="the device state API is not built yet")

pytestmark = pytest.mark.anyio

VM = 12
PATIENT = Reconnect(attempts=60, initial_delay=0.02, max_delay=0.5)  # waits out a service's start-up


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Services:
    """One socket and state directory; services started and stopped on them in turn."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.socket = tmp / "s.sock"
        self.state = tmp / "state"
        self.state.mkdir()
        self.running: ServiceProcess | None = None

    def start(self) -> None:
        self.running = ServiceProcess(self.tmp, "--state-dir", str(self.state), "--deadline", "30", socket=self.socket)

    def stop(self) -> None:
        assert self.running is not None
        assert self.running.stop() == 0, self.running.log
        self.running = None


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    services = Services(tmp_path)
    services.start()
    yield services
    if services.running is not None:
        services.stop()


def io(port: int, *, write: bool = False, value: int = 0, vp: int = 0) -> bytes:
    return io_intercept(port, 1, write=write, value=value, vp=vp, partition=VM)


async def write_cmos(client: ServiceClient, index: int, value: int) -> None:
    await client.exchange(io(0x70, write=True, value=index))
    await client.exchange(io(0x71, write=True, value=value))


async def test_an_unanswered_intercept_is_answered_by_the_restarted_service_from_the_saved_state(
    services: Services,
) -> None:
    async with connect_service(services.socket, vm=VM, reconnect=PATIENT) as client:
        await write_cmos(client, 0x34, 0xAB)
        await client.exchange(io(0x70, write=True, value=0x34))
        await client.pause()
        answers = []
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                answers.append(await client.exchange(io(0x71, vp=1)))

            tg.start_soon(read)
            await anyio.wait_all_tasks_blocked()
            await client.pause()  # answered after the read was: the read is held, unanswered
            assert client.in_flight == 1
            await anyio.to_thread.run_sync(services.stop)  # SIGTERM: the state is saved
            assert (services.state / f"vm-{VM}.json").exists()
            await anyio.to_thread.run_sync(services.start)
        (answer,) = answers
        assert answer.status is Status.COMPLETED and answer.rax & 0xFF == 0xAB
        assert client.reconnects == 1
        await client.exchange(io(0x70, write=True, value=0x34))
        assert (await client.exchange(io(0x71))).rax & 0xFF == 0xAB


async def test_a_vp_gets_a_typed_error_once_the_attempts_run_out(services: Services) -> None:
    policy = Reconnect(attempts=3, initial_delay=0.01, max_delay=0.02)
    async with connect_service(services.socket, vm=VM, reconnect=policy) as client:
        await client.pause()
        async with anyio.create_task_group() as tg:
            failures: list[BaseException] = []

            async def read() -> None:
                try:
                    await client.exchange(io(0x71, vp=2))
                except InterceptLostError as error:
                    failures.append(error)

            tg.start_soon(read)
            await anyio.wait_all_tasks_blocked()
            await client.pause()
            await anyio.to_thread.run_sync(services.stop)
        (failure,) = failures
        assert "3 attempts to open it again failed" in str(failure)
        with pytest.raises(InterceptLostError):
            await client.exchange(io(0x71))


async def test_an_intercept_resend_refuses_gets_a_typed_error_naming_it(services: Services) -> None:
    policy = Reconnect(attempts=60, initial_delay=0.02, max_delay=0.5, resend=lambda frame: False)
    async with connect_service(services.socket, vm=VM, reconnect=policy) as client:
        await client.pause()
        frame = io(0x60, vp=3)  # the i8042's data port: a read that takes a byte from its buffer
        async with anyio.create_task_group() as tg:
            failures: list[InterceptLostError] = []

            async def read() -> None:
                try:
                    await client.exchange(frame)
                except InterceptLostError as error:
                    failures.append(error)

            tg.start_soon(read)
            await anyio.wait_all_tasks_blocked()
            await client.pause()
            await anyio.to_thread.run_sync(services.stop)
            await anyio.to_thread.run_sync(services.start)
        (failure,) = failures
        assert failure.frame == frame and "not sent again" in str(failure)
        assert (await client.exchange(io(0x71))).status is Status.COMPLETED  # the session is open again


async def test_after_release_the_client_does_not_reconnect(services: Services) -> None:
    async with connect_service(services.socket, vm=VM, reconnect=PATIENT) as client:
        await client.release()
        with anyio.fail_after(10), pytest.raises(TransportClosedError):
            while True:
                await client.exchange(io(0x71))
        assert client.reconnects == 0
