"""Exits other than port I/O, and the ways a vCPU stops, each reported with its reason."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio
import pytest
from kvm_machine import run_guest
from kvm_support import requires_kvm

from dispatcher import Dispatcher, Guest, PortAccess, Router, Transport, decode_completion, on_port
from examples.guests import guest_bytes, out_loop_image
from examples.guests.devices import EchoLatch
from examples.pic import PicPair
from transports.kvm import KvmTransport, StopReason, abi, boot_flat_image
from transports.kvm.runner import terminal_exit

pytestmark = requires_kvm

SPIN = b"\xeb\xfe"  # jmp $
CLI_HLT = b"\xfa\xf4"  # cli; hlt
# mov ax, 0x8000; mov ds, ax; mov eax, [0]; out 0xE0, eax; cli; hlt: reads guest-physical 0x80000
READ_UNBACKED = bytes.fromhex("b800808ed866a1000066e7e0faf4")


def program_pic(pics: PicPair, vector_base: int) -> None:
    """ICW1-4 and OCW1 as a BIOS writes them, through the PIC's own port handlers."""
    for port, value in ((0x20, 0x11), (0x21, vector_base), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFE)):
        pics.master_ports(PortAccess(port, 1, True, value, port - 0x20, 0, 0))


class ReadyRaisesIrq0(EchoLatch):
    """The echo latch; when the guest says it is ready (writes 1), IRQ 0 rises."""

    def __init__(self, pics: PicPair) -> None:
        super().__init__()
        self.pics = pics

    @on_port(0, 4)
    def register(self, access: PortAccess) -> int | None:
        result = super().register(access)
        if access.is_write and access.value == 1:
            self.pics.set_irq(0, True)
        return result


@pytest.mark.parametrize("posted", [True, False], ids=["posted", "waited"])
@pytest.mark.anyio
async def test_interrupt_from_the_pic_reaches_the_guest(posted: bool) -> None:
    pics = PicPair()
    program_pic(pics, 0x20)
    vm, _ = boot_flat_image(guest_bytes("irq_real"))
    with vm:
        transport_box: list[KvmTransport] = []

        def wire(transport: KvmTransport) -> Transport:
            pics.irq.receiver, pics.irq.line = transport, 0
            transport_box.append(transport)
            return transport

        run = await run_guest(vm, interrupts=pics, echo=ReadyRaisesIrq0(pics), posted_writes=posted, wrap=wire)
    assert [value for is_write, _p, _s, value in run.echo.accesses if is_write] == [0x01, 0x20]
    assert run.status == 0
    assert pics.master.isr == 0x01  # the acknowledge cycle put IRQ 0 in service; the guest sent no EOI


@pytest.mark.anyio
async def test_hlt_with_interrupts_off_stops_the_vcpu() -> None:
    vm, _ = boot_flat_image(CLI_HLT)
    with vm:
        run = await run_guest(vm)
    [stop] = run.transport.stops
    assert stop.reason is StopReason.HALTED and "interrupts disabled" in stop.detail
    assert stop.rip == 0x7C02


@pytest.mark.anyio
async def test_unbacked_memory_reads_all_ones() -> None:
    vm, _ = boot_flat_image(READ_UNBACKED, ram_size=0x10000)
    with vm:
        run = await run_guest(vm)
        assert run.echo.value == 0xFFFF_FFFF
        assert run.transport.runners[0].mmio_reads >= 1
    assert run.reasons == [StopReason.HALTED]


@pytest.mark.anyio
async def test_triple_fault_is_reported_as_shutdown() -> None:
    vm, _ = boot_flat_image(guest_bytes("triple_fault"))
    with vm:
        run = await run_guest(vm)
    assert run.echo.value == 0x01
    [stop] = run.transport.stops
    assert stop.reason is StopReason.SHUTDOWN, stop
    assert "triple fault" in stop.detail


@pytest.mark.anyio
async def test_the_dispatchers_graceful_stop_stops_the_vcpus() -> None:
    vm, _ = boot_flat_image(SPIN)
    with vm:
        transport = KvmTransport(vm)
        assert transport.stops_reading  # the dispatcher asks it to stop instead of cancelling its read
        assert transport.guest.memory.read(0x7C00, 2) == SPIN
        dispatcher = Dispatcher(Router())
        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatcher.serve, transport)
            await anyio.sleep(0.2)
            dispatcher.stop()
    [stop] = transport.stops
    assert stop.reason is StopReason.STOPPED and stop.rip == 0x7C00


@pytest.mark.anyio
async def test_watchdog_stops_a_spinning_guest() -> None:
    vm, _ = boot_flat_image(SPIN)
    with vm:
        transport = KvmTransport(vm)
        async with anyio.create_task_group() as tg:
            tg.start_soon(Dispatcher(Router()).serve, transport)
            await anyio.sleep(0.2)
            transport.stop("watchdog: no progress")
    [stop] = transport.stops
    assert stop.reason is StopReason.STOPPED and stop.detail == "watchdog: no progress"
    assert stop.rip == 0x7C00  # still on the jmp $


class Tampering(Transport):
    """Passes everything through but moves the RIP of every completion for port 0x80 by one."""

    def __init__(self, inner: KvmTransport) -> None:
        self.inner = inner

    @property
    def guest(self) -> Guest:
        return self.inner.guest  # the same connection: the same guest memory

    async def receive_batch(self) -> list[bytes]:
        return await self.inner.receive_batch()

    async def send_batch(self, frames: Sequence[bytes]) -> None:
        out = []
        for frame in frames:
            completion = decode_completion(frame)
            if completion.port_number == 0x80:
                frame = completion._replace(rip=completion.rip + 1).to_bytes()
            out.append(frame)
        await self.inner.send_batch(out)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.anyio
async def test_a_posted_write_whose_completion_disagrees_stops_the_vcpu() -> None:
    # OUTs to port 0x80 for hours: only the disagreeing completion can stop this guest.
    vm, _ = boot_flat_image(out_loop_image(2**32 - 1))
    with vm:
        run = await run_guest(vm, wrap=Tampering)
    [stop] = run.transport.stops
    assert stop.reason is StopReason.ERROR and "posted OUT to port 0x80" in stop.detail


@pytest.mark.anyio
async def test_an_error_outranks_a_plain_stop_until_the_vcpu_has_stopped(caplog: pytest.LogCaptureFixture) -> None:
    vm, _ = boot_flat_image(SPIN)
    with vm:
        transport = KvmTransport(vm)
        [runner] = transport.runners
        runner.stop("exit 1")  # the exit device, written in the same batch...
        runner.stop("a posted OUT went wrong", StopReason.ERROR)  # ...as a posted OUT whose completion disagrees
        runner.stop("stopped by the VMM")
        await Dispatcher(Router()).serve(transport)
        [stop] = transport.stops
        assert (stop.reason, stop.detail) == (StopReason.ERROR, "a posted OUT went wrong")
        runner.stop("too late", StopReason.ERROR)
    assert transport.stops == [stop]
    assert "VP 0 had already stopped: too late" in caplog.text


@pytest.mark.anyio
async def test_a_waited_out_whose_completion_moves_rip_gets_exactly_that() -> None:
    # out 0x80, al; hlt; mov al, 5; out 0xE0, al; cli; hlt. The tampered completion of the first OUT
    # says RIP = 7C03, past the HLT at 7C02: the guest must go on from there and report 5.
    code = bytes.fromhex("e680f4b005e6e0faf4")
    vm, _ = boot_flat_image(code)
    with vm:
        run = await run_guest(vm, posted_writes=False, wrap=Tampering)
    assert run.echo.value == 5
    assert run.reasons == [StopReason.HALTED]
    assert run.transport.slow_completions == 1


@pytest.mark.parametrize(
    ("reason", "fill", "expected", "words"),
    [
        (abi.KVM_EXIT_FAIL_ENTRY, lambda run: setattr(run.fail_entry, "hardware_entry_failure_reason", 0x21),
         StopReason.FAIL_ENTRY, "entry failure reason 0x21"),
        (abi.KVM_EXIT_SHUTDOWN, lambda run: None, StopReason.SHUTDOWN, "triple fault"),
        (abi.KVM_EXIT_SYSTEM_EVENT, lambda run: setattr(run.system_event, "type", 2), StopReason.SYSTEM_EVENT,
         "type 2"),
        (abi.KVM_EXIT_NMI, lambda run: None, StopReason.ERROR, "exit reason 16"),
    ],
)  # fmt: skip
def test_terminal_exits_are_described(
    reason: int, fill: Callable[[abi.KvmRun], None], expected: StopReason, words: str
) -> None:
    # FAIL_ENTRY cannot be provoked on kvm-pvm (there is no hardware entry): the report is checked on kvm_run as KVM
    # would leave it.
    run = abi.KvmRun()
    run.exit_reason = reason
    fill(run)
    stop_reason, detail = terminal_exit(run)
    assert stop_reason is expected and words in detail
