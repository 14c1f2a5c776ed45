"""The example guests under KVM, served by the dispatcher and the example device models."""

from __future__ import annotations

import pytest
from kvm_machine import run_guest
from kvm_support import requires_kvm

from dispatcher import PortAccess, Router, on_port
from examples.guests import GUESTS, guest_bytes, out_loop_image
from examples.guests.devices import EchoLatch
from transports.kvm import StopReason, boot_flat_image

pytestmark = [requires_kvm, pytest.mark.anyio]


@pytest.mark.parametrize("posted", [True, False], ids=["posted", "waited"])
async def test_hello_real_prints_and_loops_back(posted: bool) -> None:
    vm, _ = boot_flat_image(guest_bytes("hello_real"))
    with vm:
        run = await run_guest(vm, posted_writes=posted)
    assert bytes(run.serial) == b"Hello from the guest\n"
    assert run.status == 0  # every byte came back through the UART's loopback
    assert run.reasons == [StopReason.STOPPED]
    assert (run.transport.posted > 0) == posted


@pytest.mark.parametrize("posted", [True, False], ids=["posted", "waited"])
@pytest.mark.parametrize("name", ["io_prot32", "io_long64"])
async def test_io_self_checks_pass(name: str, posted: bool) -> None:
    vm, _ = boot_flat_image(guest_bytes(name))
    with vm:
        run = await run_guest(vm, posted_writes=posted)
    assert run.status == 0, f"{name}: check {run.status} failed"
    assert run.echo.value == GUESTS[name].checks  # every check ran


class OffByOneLatch(EchoLatch):
    """Answers 16-bit reads with bit 0 flipped: the guests must notice."""

    @on_port(0, 4)
    def register(self, access: PortAccess) -> int | None:
        value = super().register(access)
        return value ^ 1 if value is not None and access.size == 2 else value


@pytest.mark.parametrize("name", ["io_prot32", "io_long64"])
async def test_io_self_checks_catch_a_wrong_device(name: str) -> None:
    vm, _ = boot_flat_image(guest_bytes(name))
    with vm:
        run = await run_guest(vm, echo=OffByOneLatch())
    assert run.status == 3  # check 3 is the first 16-bit IN


async def test_out_loop_reaches_the_handler_once_per_out() -> None:
    seen: list[int] = []
    router = Router()

    @router.claim(0x80)
    def post(access: PortAccess) -> None:
        seen.append(access.value)

    vm, _ = boot_flat_image(out_loop_image(3000))
    with vm:
        run = await run_guest(vm, devices=[router])
    assert len(seen) == 3000
    assert run.status == 0
    assert run.transport.posted >= 3000  # every OUT 0x80 was posted
    assert run.dispatcher.stats.per_port[0x80] == 3000
