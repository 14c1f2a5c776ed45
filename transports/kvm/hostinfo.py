"""Facts about this host's KVM that differ between back ends, measured once per process."""

from __future__ import annotations

from functools import cache

from .boot import boot_flat_image
from .exits import IoExit
from .vm import KVM_PATH, KvmError

__all__ = ["out_advances_rip"]

_OUT_HLT = bytes([0xE6, 0x80, 0xF4])  # out 0x80, al; hlt


@cache
def out_advances_rip(path: str = KVM_PATH) -> bool:
    """True if KVM reports a non-string OUT with RIP already past it (kvm-pvm, the emulator), False if at it.

    On VMX/SVM hardware the fast PIO path leaves RIP at the OUT and skips it
    on the next ``KVM_RUN`` (docs/KVM.md). Runs a two-instruction guest.
    """
    vm, vcpu = boot_flat_image(_OUT_HLT, ram_size=0x10000, path=path)
    with vm:
        exit = vcpu.run()
        if not isinstance(exit, IoExit) or exit.port != 0x80:
            raise KvmError(f"the OUT probe guest exited with {exit!r}")
        rip = int(vcpu.get_regs().rip)
    if rip not in (0x7C00, 0x7C02):
        raise KvmError(f"the OUT probe guest exited at RIP {rip:#x}, neither at nor after its OUT")
    return rip == 0x7C02
