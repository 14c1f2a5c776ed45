"""The embedded default: a guest driving the example UART through the dispatcher.

Run it with ``python -m examples demo``. Where ``/dev/kvm`` can be used, a
real guest runs: ``examples/guests/hello_real`` boots on a KVM vCPU, prints a
line through the example 16550 UART while polling its line status register,
loops a word back through it and reports on the exit device; every IN and
OUT reaches the UART as an I/O port intercept through the dispatcher.
Elsewhere it says why and runs the fake-VP demo instead: a fake VP, speaking
real intercept frames to a real Dispatcher over the in-memory transport,
programs the UART, prints a line, checks the loopback path and probes an
unclaimed port.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import anyio

from dispatcher import Dispatcher, Router
from transports.testing import CpuMode, FakePartition, FakeVP

from .uart import Uart16550

__all__ = ["main", "run_demo", "run_kvm_demo"]

COM1 = 0x3F8
THR, IER, FCR, LCR, MCR, LSR = COM1, COM1 + 1, COM1 + 2, COM1 + 3, COM1 + 4, COM1 + 5


async def guest_print(vp: FakeVP, text: bytes) -> None:
    """What a BIOS ``putc`` loop does: wait for THR empty, then write the byte."""
    for byte in text:
        while not await vp.inb(LSR) & 0x20:
            pass
        await vp.outb(THR, byte)


async def run_kvm_demo(echo: Callable[[str], object] = print) -> int:
    """Boot the hello guest on KVM through the dispatcher; 0 when the guest reports success."""
    from transports.kvm import KvmTransport, boot_flat_image

    from .debug import DebugExit
    from .guests import guest_bytes

    serial = bytearray()
    vm, _ = boot_flat_image(guest_bytes("hello_real"))
    with vm:
        transport = KvmTransport(vm)
        exit = DebugExit(on_exit=lambda status: transport.stop("the guest wrote the exit device"))
        router = Router()
        router.include(Uart16550(sink=serial.extend))
        router.include(exit)
        dispatcher = Dispatcher(router)
        echo("booting examples/guests/hello_real on a KVM vCPU; its port I/O goes through the dispatcher")
        with anyio.move_on_after(60):
            await dispatcher.serve(transport)
    echo(f"serial output: {serial.decode(errors='replace').strip()}")
    stats = dispatcher.stats
    echo(
        f"{stats.intercepts} intercepts ({transport.posted} posted writes), {stats.completed} completed; "
        "busiest ports: " + ", ".join(f"{port:#x}x{count}" for port, count in stats.per_port.most_common(3))
    )
    for stop in transport.stops:
        echo(f"vCPU {stop.vp_index}: {stop.detail}")
    passed = exit.value == 0 and serial == b"Hello from the guest\n"
    echo("demo passed" if passed else f"demo FAILED: exit device {exit.value}, serial {bytes(serial)!r}")
    return 0 if passed else 1


async def run_demo(echo: Callable[[str], object] = print) -> int:
    """The fake-VP demo; return 0 when every check the guest makes passes."""
    serial = bytearray()
    uart = Uart16550(sink=serial.extend)
    router = Router()
    router.include(uart)
    failures = 0
    async with FakePartition(router, mode=CpuMode.REAL) as partition:
        vp = partition.vp(0)
        await vp.outb(LCR, 0x80)  # DLAB on: program 115200 baud
        await vp.outw(COM1, 0x0001)  # DLL, DLM in one 16-bit OUT, split into two byte accesses
        await vp.outb(LCR, 0x03)  # 8N1, DLAB off
        await vp.outb(FCR, 0x07)  # enable and clear the 16-byte FIFOs
        await guest_print(vp, b"Hello from the guest, through intercept-dispatch!\r\n")
        echo(f"serial output: {serial.decode().strip()}")

        await vp.outb(MCR, 0x10)  # loopback
        for byte in b"ping":
            await vp.outb(THR, byte)
        echoed = bytearray()
        while await vp.inb(LSR) & 0x01:
            echoed.append(await vp.inb(COM1))
        echo(f"loopback read back: {echoed.decode()!r}")
        failures += echoed != b"ping"

        vp.rax = 0x1122_3344_5566_7788
        value = await vp.inb(0x2F8)
        echo(f"unclaimed port 0x2f8 reads {value:#04x}; RAX after 8-bit IN: {vp.rax:#018x}")
        failures += vp.rax != 0x1122_3344_5566_77FF
        echo(f"RIP advanced to {vp.rip:#x}")
    stats = partition.dispatcher.stats
    echo(
        f"{stats.intercepts} intercepts, {stats.completed} completed, "
        f"{stats.unclaimed_reads} unclaimed reads; busiest ports: "
        + ", ".join(f"{port:#x}x{count}" for port, count in stats.per_port.most_common(3))
    )
    echo("demo passed" if not failures else f"demo FAILED {failures} checks")
    return 1 if failures else 0


def main() -> int:
    from transports.kvm import kvm_available

    reason = kvm_available()
    if reason is None:
        return anyio.run(run_kvm_demo)
    print(f"KVM is not usable here ({reason}); running the demo on a fake VP instead")
    return anyio.run(run_demo)


if __name__ == "__main__":
    sys.exit(main())
