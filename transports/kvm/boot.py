"""Start a flat guest image the way a PC BIOS starts a boot sector.

Convention (all guests in ``examples/guests``): the image is copied to
guest-physical ``LOAD_ADDRESS`` (0x7C00) in RAM that starts at address 0,
and the vCPU starts in real mode at CS:IP = 0000:7C00 with SS:SP = 0000:7C00
and RFLAGS = 0x2 (interrupts off). Guests set up everything else themselves,
including protected/long mode, so the same image also boots under QEMU.
"""

from __future__ import annotations

from typing import Final

from .vm import KVM_PATH, Vcpu, Vm

__all__ = ["DEFAULT_RAM_SIZE", "LOAD_ADDRESS", "boot_flat_image", "reset_to_real_mode"]

LOAD_ADDRESS: Final = 0x7C00
DEFAULT_RAM_SIZE: Final = 2 * 1024 * 1024


def reset_to_real_mode(vcpu: Vcpu, *, cs: int = 0, ip: int = LOAD_ADDRESS, sp: int = LOAD_ADDRESS) -> None:
    """Point the vCPU at real-mode ``cs:ip`` with all data segments equal to ``cs``.

    KVM's reset state is CS = F000 with base FFFF0000 (the reset vector); a
    flat image needs the ordinary real-mode base = selector * 16 instead.
    """
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.selector = cs
        seg.base = cs << 4
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = ip
    regs.rsp = sp
    regs.rflags = 0x2  # bit 1 is reserved-as-one; IF stays clear
    vcpu.set_regs(regs)


def boot_flat_image(
    image: bytes,
    *,
    ram_size: int = DEFAULT_RAM_SIZE,
    load_address: int = LOAD_ADDRESS,
    path: str = KVM_PATH,
) -> tuple[Vm, Vcpu]:
    """Create a VM with ``ram_size`` bytes of RAM at 0, load ``image`` and return it ready to run."""
    if load_address + len(image) > ram_size:
        raise ValueError(f"image of {len(image)} bytes at {load_address:#x} does not fit in {ram_size:#x} of RAM")
    vm = Vm(path)
    try:
        vm.add_ram(0, ram_size)
        vm.write_memory(load_address, image)
        vcpu = vm.create_vcpu()
        reset_to_real_mode(vcpu, cs=0, ip=load_address, sp=load_address)
    except BaseException:
        vm.close()
        raise
    return vm, vcpu
