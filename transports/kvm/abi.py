"""The KVM user-space ABI for x86-64, mirroring ``linux/kvm.h``: ioctl numbers, constants and ctypes structures.

Names follow the kernel's (``KVM_RUN``, ``KVM_EXIT_IO``; ``struct kvm_regs``
is :class:`KvmRegs`). Every number and layout was checked against the UAPI
headers (``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h``)
by compiling a C program that prints ``offsetof``/``sizeof``/ioctl values;
``tests/kvm/test_kvm_abi.py`` repeats that check whenever a C compiler and
the headers are available.
"""

from __future__ import annotations

import ctypes
from typing import Final

# --- ioctl number encoding (asm-generic/ioctl.h; x86 uses the generic one) ---

_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2

KVMIO: Final = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (KVMIO << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# --- structures (x86-64 natural alignment, same as the C compiler's) ---


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region`` (32 bytes)."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class KvmRegs(ctypes.Structure):
    """``struct kvm_regs`` (144 bytes)."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "rax",
            "rbx",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "rsp",
            "rbp",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
            "rip",
            "rflags",
        )
    ]


class KvmSegment(ctypes.Structure):
    """``struct kvm_segment`` (24 bytes); attributes are unpacked one per byte."""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable`` (16 bytes): GDTR/IDTR."""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    ]


KVM_NR_INTERRUPTS: Final = 256


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs`` (312 bytes)."""

    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmCpuidEntry2(ctypes.Structure):
    """``struct kvm_cpuid_entry2`` (40 bytes)."""

    _fields_ = [
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    ]


class KvmCpuid2Header(ctypes.Structure):
    """Fixed head of ``struct kvm_cpuid2`` (8 bytes); entries follow (flexible array)."""

    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


def kvm_cpuid2_type(nent: int) -> type[ctypes.Structure]:
    """A ``struct kvm_cpuid2`` type with room for ``nent`` entries."""

    class KvmCpuid2(ctypes.Structure):
        _fields_ = [
            ("nent", ctypes.c_uint32),
            ("padding", ctypes.c_uint32),
            ("entries", KvmCpuidEntry2 * nent),
        ]

    return KvmCpuid2


class KvmTranslation(ctypes.Structure):
    """``struct kvm_translation`` (24 bytes) for KVM_TRANSLATE."""

    _fields_ = [
        ("linear_address", ctypes.c_uint64),
        ("physical_address", ctypes.c_uint64),
        ("valid", ctypes.c_uint8),
        ("writeable", ctypes.c_uint8),
        ("usermode", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 5),
    ]


class KvmInterrupt(ctypes.Structure):
    """``struct kvm_interrupt`` (4 bytes)."""

    _fields_ = [("irq", ctypes.c_uint32)]


# --- struct kvm_run: the fixed header plus the exit union at offset 32 ---


class KvmRunIo(ctypes.Structure):
    """``kvm_run.io`` for KVM_EXIT_IO."""

    _fields_ = [
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),  # relative to the start of kvm_run
    ]


class KvmRunMmio(ctypes.Structure):
    """``kvm_run.mmio`` for KVM_EXIT_MMIO."""

    _fields_ = [
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    ]


class KvmRunFailEntry(ctypes.Structure):
    """``kvm_run.fail_entry`` for KVM_EXIT_FAIL_ENTRY."""

    _fields_ = [
        ("hardware_entry_failure_reason", ctypes.c_uint64),
        ("cpu", ctypes.c_uint32),
    ]


class KvmRunHw(ctypes.Structure):
    """``kvm_run.hw`` for KVM_EXIT_UNKNOWN."""

    _fields_ = [("hardware_exit_reason", ctypes.c_uint64)]


class KvmRunEx(ctypes.Structure):
    """``kvm_run.ex`` for KVM_EXIT_EXCEPTION."""

    _fields_ = [("exception", ctypes.c_uint32), ("error_code", ctypes.c_uint32)]


class KvmRunInternal(ctypes.Structure):
    """``kvm_run.internal`` for KVM_EXIT_INTERNAL_ERROR."""

    _fields_ = [
        ("suberror", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    ]


class KvmRunSystemEvent(ctypes.Structure):
    """``kvm_run.system_event`` for KVM_EXIT_SYSTEM_EVENT."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    ]


class KvmRunExit(ctypes.Union):
    """The exit-information union; the kernel pads it to 256 bytes."""

    _fields_ = [
        ("hw", KvmRunHw),
        ("fail_entry", KvmRunFailEntry),
        ("ex", KvmRunEx),
        ("io", KvmRunIo),
        ("mmio", KvmRunMmio),
        ("internal", KvmRunInternal),
        ("system_event", KvmRunSystemEvent),
        ("padding", ctypes.c_char * 256),
    ]


class KvmRun(ctypes.Structure):
    """``struct kvm_run`` up to and including ``kvm_dirty_regs`` (304 bytes).

    The synchronised-register area (``s``, at offset 304) and the PIO data page
    beyond it are reached through the mmap directly, not through this type.
    """

    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("u", KvmRunExit),
        ("kvm_valid_regs", ctypes.c_uint64),
        ("kvm_dirty_regs", ctypes.c_uint64),
    ]


KVM_RUN_SYNC_REGS_OFFSET: Final = 304  # offsetof(struct kvm_run, s)

# --- ioctls ---

KVM_API_VERSION: Final = 12

# system ioctls (on /dev/kvm)
KVM_GET_API_VERSION: Final = _io(0x00)
KVM_CREATE_VM: Final = _io(0x01)
KVM_CHECK_EXTENSION: Final = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = _io(0x04)
KVM_GET_SUPPORTED_CPUID: Final = _iowr(0x05, ctypes.sizeof(KvmCpuid2Header))

# VM ioctls
KVM_CREATE_VCPU: Final = _io(0x41)
KVM_SET_USER_MEMORY_REGION: Final = _iow(0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR: Final = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR: Final = _iow(0x48, ctypes.sizeof(ctypes.c_uint64))

# vCPU ioctls
KVM_RUN: Final = _io(0x80)
KVM_GET_REGS: Final = _ior(0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS: Final = _iow(0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS: Final = _ior(0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS: Final = _iow(0x84, ctypes.sizeof(KvmSregs))
KVM_TRANSLATE: Final = _iowr(0x85, ctypes.sizeof(KvmTranslation))
KVM_INTERRUPT: Final = _iow(0x86, ctypes.sizeof(KvmInterrupt))
KVM_SET_CPUID2: Final = _iow(0x90, ctypes.sizeof(KvmCpuid2Header))

# --- memory region flags ---

KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1

# --- capabilities (KVM_CHECK_EXTENSION arguments) ---

KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_SET_TSS_ADDR: Final = 4
KVM_CAP_EXT_CPUID: Final = 7
KVM_CAP_NR_VCPUS: Final = 9
KVM_CAP_SET_IDENTITY_MAP_ADDR: Final = 37
KVM_CAP_MAX_VCPUS: Final = 66
KVM_CAP_SYNC_REGS: Final = 74
KVM_CAP_READONLY_MEM: Final = 81
KVM_CAP_IMMEDIATE_EXIT: Final = 136

# --- exit reasons (kvm_run.exit_reason) ---

KVM_EXIT_UNKNOWN: Final = 0
KVM_EXIT_EXCEPTION: Final = 1
KVM_EXIT_IO: Final = 2
KVM_EXIT_HYPERCALL: Final = 3
KVM_EXIT_DEBUG: Final = 4
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_IRQ_WINDOW_OPEN: Final = 7
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_SET_TPR: Final = 11
KVM_EXIT_TPR_ACCESS: Final = 12
KVM_EXIT_NMI: Final = 16
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_SYSTEM_EVENT: Final = 24
KVM_EXIT_IOAPIC_EOI: Final = 26
KVM_EXIT_HYPERV: Final = 27
KVM_EXIT_DIRTY_RING_FULL: Final = 31
KVM_EXIT_NOTIFY: Final = 37

KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1

KVM_INTERNAL_ERROR_EMULATION: Final = 1
KVM_INTERNAL_ERROR_SIMUL_EX: Final = 2
KVM_INTERNAL_ERROR_DELIVERY_EV: Final = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: Final = 4

# kvm_run.kvm_valid_regs / kvm_dirty_regs bits (KVM_CAP_SYNC_REGS)
KVM_SYNC_X86_REGS: Final = 1 << 0
KVM_SYNC_X86_SREGS: Final = 1 << 1
KVM_SYNC_X86_EVENTS: Final = 1 << 2

# --- vCPU and VM state for snapshots (transports.kvm.snapshot) ---
# Structures kept opaque (saved and restored byte for byte) are given by their size alone.

KVM_FPU_SIZE: Final = 416  # sizeof(struct kvm_fpu)
"""Bytes of ``struct kvm_fpu`` (x87, MXCSR and XMM registers without XSAVE)."""
KVM_XSAVE_SIZE: Final = 4096  # sizeof(struct kvm_xsave): the legacy area, the XSAVE header and the extended states
"""Bytes of ``struct kvm_xsave`` (``KVM_GET_XSAVE2`` may need more: ``KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)``)."""
KVM_XCRS_SIZE: Final = 392  # sizeof(struct kvm_xcrs)
"""Bytes of ``struct kvm_xcrs`` (XCR0 and friends)."""
KVM_VCPU_EVENTS_SIZE: Final = 64  # sizeof(struct kvm_vcpu_events)
"""Bytes of ``struct kvm_vcpu_events`` (pending exception, interrupt, NMI, interrupt shadow, SMM)."""
KVM_DEBUGREGS_SIZE: Final = 128  # sizeof(struct kvm_debugregs)
"""Bytes of ``struct kvm_debugregs`` (DR0-3, DR6, DR7)."""
KVM_LAPIC_SIZE: Final = 1024  # sizeof(struct kvm_lapic_state)
"""Bytes of ``struct kvm_lapic_state`` (only with an in-kernel irqchip)."""


class KvmMsrEntry(ctypes.Structure):
    """``struct kvm_msr_entry`` (16 bytes)."""

    _fields_ = [("index", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("data", ctypes.c_uint64)]


def kvm_msrs_type(nmsrs: int) -> type[ctypes.Structure]:
    """A ``struct kvm_msrs`` type with room for ``nmsrs`` entries."""

    class KvmMsrs(ctypes.Structure):
        _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("entries", KvmMsrEntry * nmsrs)]

    return KvmMsrs


def kvm_msr_list_type(nmsrs: int) -> type[ctypes.Structure]:
    """A ``struct kvm_msr_list`` type with room for ``nmsrs`` indices."""

    class KvmMsrList(ctypes.Structure):
        _fields_ = [("nmsrs", ctypes.c_uint32), ("indices", ctypes.c_uint32 * nmsrs)]

    return KvmMsrList


class KvmMpState(ctypes.Structure):
    """``struct kvm_mp_state`` (4 bytes)."""

    _fields_ = [("mp_state", ctypes.c_uint32)]


class KvmClockData(ctypes.Structure):
    """``struct kvm_clock_data`` (48 bytes): the VM's kvmclock."""

    _fields_ = [
        ("clock", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("pad0", ctypes.c_uint32),
        ("realtime", ctypes.c_uint64),
        ("host_tsc", ctypes.c_uint64),
        ("pad", ctypes.c_uint32 * 4),
    ]


KVM_GET_MSR_INDEX_LIST: Final = _iowr(0x02, 4)  # system ioctl; sizeof(struct kvm_msr_list) without the indices
KVM_GET_MSRS: Final = _iowr(0x88, 8)  # sizeof(struct kvm_msrs) without the entries
KVM_SET_MSRS: Final = _iow(0x89, 8)
KVM_GET_FPU: Final = _ior(0x8C, KVM_FPU_SIZE)
KVM_SET_FPU: Final = _iow(0x8D, KVM_FPU_SIZE)
KVM_GET_LAPIC: Final = _ior(0x8E, KVM_LAPIC_SIZE)
KVM_SET_LAPIC: Final = _iow(0x8F, KVM_LAPIC_SIZE)
KVM_GET_CPUID2: Final = _iowr(0x91, ctypes.sizeof(KvmCpuid2Header))
KVM_GET_MP_STATE: Final = _ior(0x98, ctypes.sizeof(KvmMpState))
KVM_SET_MP_STATE: Final = _iow(0x99, ctypes.sizeof(KvmMpState))
KVM_GET_VCPU_EVENTS: Final = _ior(0x9F, KVM_VCPU_EVENTS_SIZE)
KVM_SET_VCPU_EVENTS: Final = _iow(0xA0, KVM_VCPU_EVENTS_SIZE)
KVM_GET_DEBUGREGS: Final = _ior(0xA1, KVM_DEBUGREGS_SIZE)
KVM_SET_DEBUGREGS: Final = _iow(0xA2, KVM_DEBUGREGS_SIZE)
KVM_GET_TSC_KHZ: Final = _io(0xA3)
KVM_GET_XSAVE: Final = _ior(0xA4, KVM_XSAVE_SIZE)
KVM_SET_XSAVE: Final = _iow(0xA5, KVM_XSAVE_SIZE)
KVM_GET_XCRS: Final = _ior(0xA6, KVM_XCRS_SIZE)
KVM_SET_XCRS: Final = _iow(0xA7, KVM_XCRS_SIZE)
KVM_GET_XSAVE2: Final = _ior(0xCF, KVM_XSAVE_SIZE)
KVM_SET_CLOCK: Final = _iow(0x7B, ctypes.sizeof(KvmClockData))
KVM_GET_CLOCK: Final = _ior(0x7C, ctypes.sizeof(KvmClockData))

KVM_CAP_IRQCHIP: Final = 0
KVM_CAP_MP_STATE: Final = 14
KVM_CAP_ADJUST_CLOCK: Final = 39
KVM_CAP_VCPU_EVENTS: Final = 41
KVM_CAP_DEBUGREGS: Final = 50
KVM_CAP_XSAVE: Final = 55
KVM_CAP_XCRS: Final = 56
KVM_CAP_XSAVE2: Final = 208
