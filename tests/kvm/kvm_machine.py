"""Run a test guest through the real dispatcher: KvmTransport, device models, a Router.

The devices are what the guests in examples/guests expect: the example
16550 UART at 0x3F8, the echo latch at 0xE0-0xE3 and isa-debug-exit at 0x501,
whose write stops the vCPUs. Every other port is unclaimed (reads all ones).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import anyio

from dispatcher import Dispatcher, Router, Transport
from examples.debug import DebugExit
from examples.guests.devices import EchoLatch
from examples.uart import Uart16550
from transports.kvm import InterruptController, KvmTransport, StopReason, Vm


@dataclass
class GuestRun:
    """A finished run: the devices as the guest left them and why the vCPUs stopped."""

    transport: KvmTransport
    dispatcher: Dispatcher
    exit: DebugExit
    echo: EchoLatch
    serial: bytearray = field(default_factory=bytearray)

    @property
    def status(self) -> int | None:
        """The byte the guest wrote to the exit device (0 = every check passed), or None."""
        return self.exit.value

    @property
    def reasons(self) -> list[StopReason]:
        return [stop.reason for stop in self.transport.stops]


async def run_guest(
    vm: Vm,
    *,
    devices: Iterable[object] = (),
    posted_writes: bool = True,
    interrupts: InterruptController | None = None,
    timeout: float = 60.0,
    wrap: Callable[[KvmTransport], Transport] | None = None,
    echo: EchoLatch | None = None,
) -> GuestRun:
    """Serve the VM's vCPUs until they stop (the exit device stops them), or stop them after ``timeout``."""
    transport = KvmTransport(vm, posted_writes=posted_writes, interrupts=interrupts)
    run = GuestRun(transport, Dispatcher(Router()), DebugExit(on_exit=lambda s: transport.stop(f"exit {s}")),
                   echo if echo is not None else EchoLatch())  # fmt: skip
    router = Router()
    for device in (Uart16550(run.serial.extend), run.echo, run.exit, *devices):
        router.include(device)
    run.dispatcher = Dispatcher(router, deadline=None)
    transport.lock = run.dispatcher.lock  # the interrupt acknowledge cycle runs device code on the vCPU thread
    with anyio.move_on_after(timeout) as scope:
        await run.dispatcher.serve(wrap(transport) if wrap is not None else transport)
    if scope.cancelled_caught:
        await transport.aclose()
        raise AssertionError(f"the guest did not finish within {timeout} s: {transport.stops}")
    return run
