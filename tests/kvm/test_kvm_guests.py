"""The example guests under KVM, driven by the ad-hoc loop in kvm_harness."""

from __future__ import annotations

import pytest
from kvm_harness import Machine
from kvm_support import requires_kvm

from examples.guests import GUESTS, guest_bytes, out_loop_image
from transports.kvm import IoExit, IrqWindowOpenExit, boot_flat_image

pytestmark = requires_kvm


def test_hello_real_prints_and_loops_back() -> None:
    vm, vcpu = boot_flat_image(guest_bytes("hello_real"))
    with vm:
        machine = Machine()
        machine.run(vcpu)
    assert bytes(machine.uart.output) == b"Hello from the guest\n"
    assert machine.uart.loopback
    assert machine.status == 0


def test_hello_real_reports_a_broken_loopback() -> None:
    vm, vcpu = boot_flat_image(guest_bytes("hello_real"))
    with vm:
        machine = Machine()
        original = machine.uart.write

        def corrupting_write(port: int, value: int) -> None:
            original(port, value ^ 0x20 if machine.uart.loopback else value)

        machine.uart.write = corrupting_write  # type: ignore[method-assign]
        machine.run(vcpu)
    assert machine.status == 1


@pytest.mark.parametrize("name", ["io_prot32", "io_long64"])
def test_io_self_checks_pass(name: str) -> None:
    vm, vcpu = boot_flat_image(guest_bytes(name))
    with vm:
        machine = Machine()
        machine.run(vcpu)
    assert machine.status == 0, f"{name}: check {machine.status} failed"
    assert machine.echo.value == GUESTS[name].checks  # every check ran


@pytest.mark.parametrize("name", ["io_prot32", "io_long64"])
def test_io_self_checks_catch_a_wrong_device(name: str) -> None:
    """A device that answers the wrong value must make the guest fail (the checks are not vacuous)."""
    vm, vcpu = boot_flat_image(guest_bytes(name))
    with vm:
        machine = Machine()
        original = machine.echo.read

        def off_by_one(port: int, size: int) -> int:
            value = original(port, size)
            return value ^ 1 if size == 2 else value

        machine.echo.read = off_by_one  # type: ignore[method-assign]
        machine.run(vcpu)
    assert machine.status == 3  # check 3 is the first 16-bit IN


def test_out_loop_runs_exactly_n_outs() -> None:
    vm, vcpu = boot_flat_image(out_loop_image(500))
    with vm:
        machine = Machine(record=True)
        machine.run(vcpu)
    ports = [e.port for e in machine.io_exits]
    assert ports == [0x80] * 500 + [0x501]
    assert machine.status == 0


def test_injected_interrupt_reaches_the_guest() -> None:
    vm, vcpu = boot_flat_image(guest_bytes("irq_real"))
    with vm:
        exit = vcpu.run()
        assert isinstance(exit, IoExit) and exit.port == 0xE0 and vcpu.read_io_data(exit) == b"\x01"
        vcpu.request_interrupt_window = True
        for _ in range(1000):
            exit = vcpu.run()
            if isinstance(exit, IrqWindowOpenExit):
                break
        else:
            pytest.fail("the interrupt window never opened")
        assert vcpu.ready_for_interrupt_injection and vcpu.if_flag
        vcpu.request_interrupt_window = False
        vcpu.inject_interrupt(0x20)
        machine = Machine()
        machine.run(vcpu)
    assert [data for kind, _p, _s, data in machine.echo.log if kind == "out"] == [0x20]
    assert machine.status == 0
