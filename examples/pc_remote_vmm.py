"""The PC with its devices in another process: every intercept goes to ``python -m examples serve``.

The VMM keeps only the vCPU and guest memory. It connects to the service's
UNIX socket (refusing one served by a user it does not trust), says HELLO
as VM 0, reads the service's HELLO_REPLY and port announcement
(:func:`~transports.service.client.open_session`), shares every memory slot
(memfd, SCM_RIGHTS: string I/O in the service reads and writes guest RAM in
place) and then relays: intercept frames from the vCPU threads to the
socket, completions back. The board's signals come through the service's
platform block (:mod:`examples.pc_remote_devices`): the machine loop reads when the
timers next need a look and whether INTR is high, the exit device and the
console output; an interrupt acknowledge is a read of its own.

The relay speaks to the socket directly rather than through
:class:`transports.service.ServiceClient`, which allows one intercept in
flight per VP: a posted write leaves several.

Before the vCPU starts, the announcement must show the platform block: a
service started without it (a plain ``serve`` of other devices) ends the
run at once with :class:`RemotePcError`, whose message is the command that
starts the right one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from dispatcher import (
    COMPLETION,
    Access,
    Completion,
    DispatchError,
    PortRange,
    Status,
    TransportError,
    decode_completion,
    frame_ids,
    message_type,
)
from transports.kvm import KvmTransport
from transports.service import io_intercept
from transports.service.client import open_session
from transports.service.command_line import describe_unreachable
from transports.shared_memory import share_region
from transports.socket_path import allowed_server_uids, check_server
from transports.unix import UnixTransport, connect_unix

from .pc_kvm import Outcome, PcConfig, PcResult, build_vm
from .pc_remote_devices import ACK, CONSOLE, EXIT, NEXT_DUE, PLATFORM_BASE, PLATFORM_VP

__all__ = [
    "ANNOUNCE_TIMEOUT",
    "RemotePcError",
    "RemotePlatform",
    "check_platform",
    "forward",
    "run_remote_pc",
    "serve_command",
    "share_memory",
]

ANNOUNCE_TIMEOUT = 30.0
"""Seconds to wait for the service's HELLO_REPLY and port announcement (sent at once after the HELLO)."""
PLATFORM_PORTS = range(PLATFORM_BASE, PLATFORM_BASE + 16)


class RemotePcError(DispatchError):
    """The service at the socket cannot run the PC's devices: unreachable, silent, or without the platform block."""


def serve_command(socket: str) -> str:
    """The command that serves the PC's devices, platform block included, at ``socket``."""
    return f"python -m examples serve --socket {socket} --device examples.pc_remote_devices:pc_devices"


def check_platform(ranges: list[PortRange], socket: str) -> None:
    """Raise :class:`RemotePcError` unless ``ranges`` claim the platform block's ports for reads."""
    missing = [p for p in PLATFORM_PORTS if not any(r.first <= p <= r.last and r.access & Access.READ for r in ranges)]
    if missing:
        raise RemotePcError(
            f"the service at {socket} has no PC platform block (ports {PLATFORM_PORTS[0]:#x}-{PLATFORM_PORTS[-1]:#x}: "
            f"interrupts, timers, exit device, console); start it with: {serve_command(socket)}"
        )


class RemotePlatform:
    """The service's platform block, read with intercepts from :data:`PLATFORM_VP` (one at a time)."""

    def __init__(self, connection: UnixTransport) -> None:
        self.connection = connection
        self.transport: KvmTransport | None = None
        self._lock = anyio.Lock()
        self._answer: Completion | None = None
        self._answered = anyio.Event()

    async def read(self, offset: int) -> int:
        """One dword register of the platform block."""
        # Shielded: a read whose answer is still on its way would otherwise leave it to the next one.
        async with self._lock:
            with anyio.CancelScope(shield=True):
                self._answered = anyio.Event()
                await self.connection.send_batch([io_intercept(PLATFORM_BASE + offset, 4, write=False, vp=PLATFORM_VP)])
                await self._answered.wait()
                answer = self._answer
        if answer is None or answer.status is not Status.COMPLETED:
            raise TransportError(f"the service's platform block did not answer a read at +{offset:#x}: {answer}")
        return answer.rax & 0xFFFF_FFFF

    def deliver(self, completion: Completion | None) -> None:
        """A completion for :data:`PLATFORM_VP` arrived (None: the connection ended)."""
        self._answer = completion
        self._answered.set()

    async def acknowledge_pending(self) -> int | None:
        """The interrupt acknowledge cycle in the service's i8259A pair (the transport's remote controller)."""
        value = await self.read(ACK)
        if self.transport is not None:
            self.transport.set_irq(0, bool(value & 0x200))
        return value & 0xFF if value & 0x100 else None


async def _receive(connection: UnixTransport, platform: RemotePlatform | None, transport: KvmTransport) -> None:
    # Everything the service sends after the opening: completions for the vCPUs or the platform.
    try:
        while frames := await connection.receive_batch():
            for_vcpus = []
            for frame in frames:
                kind = message_type(frame)
                if kind != COMPLETION:
                    raise TransportError(f"the service sent a frame of type {kind:#x}")
                if platform is not None and frame_ids(frame)[1] == PLATFORM_VP:
                    platform.deliver(decode_completion(frame))
                else:
                    for_vcpus.append(frame)
            if for_vcpus:
                await transport.send_batch(for_vcpus)
    finally:
        if platform is not None:
            platform.deliver(None)
        transport.stop("the service closed the connection")


async def _relay(transport: KvmTransport, connection: UnixTransport) -> None:
    while frames := await transport.receive_batch():
        await connection.send_batch(frames)


async def share_memory(transport: KvmTransport, connection: UnixTransport) -> None:
    """Share every memory slot of the transport's VM with the service (ROM read-only)."""
    for region in transport.vm.regions:
        await share_region(connection, region.guest_phys_addr, region.fd, region.size, read_only=region.readonly)


async def forward(transport: KvmTransport, connection: UnixTransport) -> None:
    """Relay the vCPUs' intercepts to the service and its completions back until the vCPUs stop.

    Open the session first (:func:`~transports.service.client.open_session`), and share the memory
    (:func:`share_memory`) for string I/O to work.
    """
    async with anyio.create_task_group() as tg:
        tg.start_soon(_receive, connection, None, transport)
        await _relay(transport, connection)
        tg.cancel_scope.cancel()


async def _look(platform: RemotePlatform, outcome: Outcome, config: PcConfig) -> None:
    # Print what the guest wrote to the console, and end the run if it wrote the exit device.
    sink = outcome.watch.wrap(config.serial_sink)
    while True:
        console = await platform.read(CONSOLE)
        count = console >> 24
        if count:
            sink(console.to_bytes(4, "little")[:count])
        if count < 3:
            break
    exit = await platform.read(EXIT)
    if exit & 0x100:
        outcome.exited((exit & 0xFF) << 1 | 1)
    elif exit & 0x200:
        outcome.reset()


async def _board(platform: RemotePlatform, transport: KvmTransport, outcome: Outcome, config: PcConfig) -> None:
    # The machine loop: INTR and the timers, then the console and the exit device.
    while True:
        due = await platform.read(NEXT_DUE)
        transport.set_irq(0, bool(due & 0x8000_0000))
        await _look(platform, outcome, config)
        await anyio.sleep(min((due & 0x7FFF_FFFF) / 1e6, config.poll_interval))


async def run_remote_pc(
    config: PcConfig,
    socket: str,
    *,
    prepare: Callable[[KvmTransport], Awaitable[object]] | None = None,
    finish: Callable[[KvmTransport], Awaitable[object]] | None = None,
) -> PcResult:
    """Boot the PC with its devices in the ``serve`` process at ``socket``; as :func:`~examples.pc_kvm.run_pc`.

    ``prepare`` is awaited once the memory is shared, before the vCPU first
    runs (a restore sets memory, vCPU and devices there); ``finish`` once
    the vCPU has stopped (not at the timeout), the VM and the session still
    open (a snapshot is taken there).

    Raises :class:`RemotePcError`, before the vCPU starts, when no service
    answers at ``socket`` or the one there has no platform block.
    """
    outcome = Outcome(config)
    vm = build_vm(config)
    with vm:
        where = f"the service at {socket}"
        try:
            connection = await connect_unix(socket, name=where)
        except (OSError, ValueError) as error:
            raise RemotePcError(describe_unreachable(socket, error, start=serve_command(socket))) from None
        try:
            check_server(connection.socket, allowed_server_uids(), path=socket)
            _, ranges = await open_session(connection, where=where, timeout=ANNOUNCE_TIMEOUT)
            check_platform(ranges, socket)
        except DispatchError as error:
            await connection.aclose()
            if isinstance(error, RemotePcError):
                raise
            # The errors name the service (or the socket) already.
            raise RemotePcError(str(error)) from None
        platform = RemotePlatform(connection)
        transport = outcome.transport = KvmTransport(
            vm, posted_writes=config.posted_writes, interrupts=platform, kvm_path=config.kvm_path
        )
        platform.transport = transport
        try:
            await share_memory(transport, connection)
            if prepare is not None:
                await prepare(transport)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_receive, connection, platform, transport)
                board = anyio.CancelScope()

                async def run_board() -> None:
                    with board:
                        await _board(platform, transport, outcome, config)

                tg.start_soon(run_board)
                with anyio.move_on_after(config.timeout if config.timeout is not None else float("inf")) as scope:
                    await _relay(transport, connection)
                if scope.cancelled_caught:
                    outcome.finish(f"timed out after {config.timeout:g} s", timed_out=True)
                else:
                    board.cancel()
                    # The vCPU has stopped: one last look at the exit device and the console.
                    with anyio.move_on_after(5):
                        await _look(platform, outcome, config)
                    if finish is not None:
                        await finish(transport)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await transport.aclose()
                await connection.aclose()
    return outcome.done()
