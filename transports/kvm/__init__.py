"""Pure-Python KVM backend (x86-64 hosts): a VM, vCPUs and their exits, and :class:`KvmTransport`,
whose vCPUs' port I/O a :class:`dispatcher.Dispatcher` serves. docs/KVM.md has the details."""

from __future__ import annotations

from .boot import DEFAULT_RAM_SIZE, LOAD_ADDRESS, boot_flat_image, reset_to_real_mode
from .exits import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    IrqWindowOpenExit,
    MmioExit,
    OtherExit,
    ShutdownExit,
    SystemEventExit,
    VcpuExit,
)
from .memory import LinearReader, vm_memory
from .runner import StopReason, VcpuHost, VcpuStop
from .transport import InterruptController, KvmTransport
from .vm import (
    KICK_SIGNAL,
    PAGE_SIZE,
    KvmError,
    KvmUnavailableError,
    MemorySlot,
    Vcpu,
    Vm,
    install_kick_handler,
    kvm_available,
)

__all__ = [
    "DEFAULT_RAM_SIZE",
    "KICK_SIGNAL",
    "LOAD_ADDRESS",
    "PAGE_SIZE",
    "FailEntryExit",
    "HltExit",
    "InternalErrorExit",
    "InterruptController",
    "InterruptedExit",
    "IoExit",
    "IrqWindowOpenExit",
    "KvmError",
    "KvmTransport",
    "KvmUnavailableError",
    "LinearReader",
    "MemorySlot",
    "MmioExit",
    "OtherExit",
    "ShutdownExit",
    "StopReason",
    "SystemEventExit",
    "Vcpu",
    "VcpuExit",
    "VcpuHost",
    "VcpuStop",
    "Vm",
    "boot_flat_image",
    "install_kick_handler",
    "kvm_available",
    "reset_to_real_mode",
    "vm_memory",
]
