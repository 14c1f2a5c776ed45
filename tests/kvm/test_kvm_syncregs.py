"""The sync-register view agrees with the ABI structures and with KVM_GET_REGS/KVM_GET_SREGS."""

from __future__ import annotations

import ctypes

from kvm_support import requires_kvm

from transports.kvm import abi, boot_flat_image
from transports.kvm.syncregs import (
    CONTEXT_SIZE,
    EVENTS_OFFSET,
    REGS_OFFSET,
    REGS_STRUCT,
    SREGS_OFFSET,
    parse_context,
)


def test_offsets_follow_the_uapi_structures() -> None:
    assert REGS_OFFSET == abi.KvmRun.kvm_dirty_regs.offset + 8 == 304
    assert SREGS_OFFSET - REGS_OFFSET == ctypes.sizeof(abi.KvmRegs) == REGS_STRUCT.size
    assert ctypes.sizeof(abi.KvmSregs) == EVENTS_OFFSET - SREGS_OFFSET
    assert abi.KvmSregs.efer.offset + 8 == CONTEXT_SIZE
    assert abi.KvmSregs.ss.offset == 5 * ctypes.sizeof(abi.KvmSegment)


@requires_kvm
def test_the_sync_area_holds_what_the_ioctls_return() -> None:
    vm, vcpu = boot_flat_image(bytes.fromhex("b83412e680f4"))  # mov ax, 0x1234; ...; out 0x80, al; hlt
    with vm:
        ctypes.c_uint64.from_buffer(vcpu.run_map, 288).value = 7  # kvm_valid_regs: regs, sregs, events
        vcpu.run()
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        synced = REGS_STRUCT.unpack_from(vcpu.run_map, REGS_OFFSET)
        assert synced[0] == regs.rax and synced[16] == regs.rip and synced[17] == regs.rflags
        context = parse_context(vcpu.run_map[SREGS_OFFSET : SREGS_OFFSET + CONTEXT_SIZE])
        assert (context.cs.base, context.cs.selector) == (sregs.cs.base, sregs.cs.selector)
        assert context.cr0 == sregs.cr0 and context.efer == sregs.efer
        assert context.code_bits == 16 and not context.protected and context.cpl == 0
