"""Vm/Vcpu basics: memory slots, ROM, registers, closing."""

from __future__ import annotations

import pytest
from kvm_machine import run_guest
from kvm_support import requires_kvm

from examples.guests import ROM_CHECK_ADDRESS, ROM_CHECK_IMAGE, guest_bytes
from transports.kvm import KvmUnavailableError, Vm, abi, boot_flat_image, kvm_available


def test_missing_device_is_reported_not_raised(tmp_path: object) -> None:
    assert kvm_available("/nonexistent/kvm") is not None
    with pytest.raises(KvmUnavailableError):
        Vm("/nonexistent/kvm")


@requires_kvm
def test_ram_is_memfd_backed_and_readable() -> None:
    with Vm() as vm:
        ram = vm.add_ram(0, 0x10000)
        high = vm.add_ram(0x10000, 0x1000, name="high")
        vm.write_memory(0xFFFE, b"\x01\x02\x03\x04")  # spans both slots
        assert vm.read_memory(0xFFFE, 4) == b"\x01\x02\x03\x04"
        assert ram.mem[0xFFFE:0x10000] == b"\x01\x02"
        assert high.mem[0:2] == b"\x03\x04"
        # The memfd is the backing store, so another mapping (or process) sees the bytes.
        assert __import__("os").pread(high.fd, 2, 0) == b"\x03\x04"
        assert [r.slot for r in vm.regions] == [0, 1]
        with pytest.raises(ValueError, match="overlaps"):
            vm.add_ram(0x8000, 0x1000)
        with pytest.raises(ValueError, match="page"):
            vm.add_ram(0x20000, 0x100)
        with pytest.raises(ValueError, match="not backed"):
            vm.read_memory(0x11000, 1)
    assert vm.closed
    vm.close()  # idempotent


@requires_kvm
def test_registers_round_trip() -> None:
    with Vm() as vm:
        vm.add_ram(0, 0x10000)
        vcpu = vm.create_vcpu()
        regs = vcpu.get_regs()
        regs.rbx = 0x1122334455667788
        vcpu.set_regs(regs)
        assert vcpu.get_regs().rbx == 0x1122334455667788
        sregs = vcpu.get_sregs()
        assert sregs.cs.selector == 0xF000 and sregs.cs.base == 0xFFFF0000  # architectural reset state
        assert vm.check_extension(abi.KVM_CAP_IMMEDIATE_EXIT)


@requires_kvm
@pytest.mark.anyio
async def test_rom_is_executable_but_not_writable_by_the_guest() -> None:
    vm, _ = boot_flat_image(guest_bytes("rom_check"), ram_size=0x80000)  # RAM ends below the ROM
    with vm:
        rom = vm.add_rom(ROM_CHECK_ADDRESS, ROM_CHECK_IMAGE)
        assert rom.readonly and rom.size == 0x1000
        run = await run_guest(vm)
        assert run.status == 0
        reports = [value for is_write, _port, _size, value in run.echo.accesses if is_write]
        assert reports == [0x42, 0xAA]  # ROM code ran; ROM byte survived the write
        assert run.transport.runners[0].mmio_writes == 1  # the write to ROM exited as MMIO and went nowhere
        assert vm.read_memory(ROM_CHECK_ADDRESS + 0x10, 1) == b"\xaa"


@requires_kvm
def test_vmm_can_write_rom_contents() -> None:
    with Vm() as vm:
        vm.add_rom(0xF0000, b"\x90" * 16, size=0x2000)
        vm.write_memory(0xF1000, b"\xcc")
        assert vm.read_memory(0xF0000, 2) == b"\x90\x90"
        assert vm.read_memory(0xF1000, 1) == b"\xcc"
