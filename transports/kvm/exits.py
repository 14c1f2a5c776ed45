"""Typed views of why ``KVM_RUN`` returned (one frozen dataclass per exit kind)."""

from __future__ import annotations

from dataclasses import dataclass

from . import abi

__all__ = [
    "FailEntryExit",
    "HltExit",
    "InternalErrorExit",
    "InterruptedExit",
    "IoExit",
    "IrqWindowOpenExit",
    "MmioExit",
    "OtherExit",
    "ShutdownExit",
    "SystemEventExit",
    "VcpuExit",
    "decode_exit",
]


@dataclass(frozen=True, slots=True)
class IoExit:
    """KVM_EXIT_IO: the guest executed IN/OUT/INS/OUTS on a port KVM does not own.

    ``is_write`` is True for OUT/OUTS. ``count * size`` data bytes live at
    ``data_offset`` in the vCPU's mmap (``Vcpu.read_io_data``). For OUT/OUTS
    they hold what the guest wrote; for IN/INS the VMM fills them
    (``Vcpu.write_io_data``) and KVM consumes them on the next ``KVM_RUN``.
    """

    is_write: bool
    size: int
    port: int
    count: int
    data_offset: int


@dataclass(frozen=True, slots=True)
class MmioExit:
    """KVM_EXIT_MMIO: an access to unmapped guest-physical memory or a write to ROM."""

    phys_addr: int
    data: bytes
    is_write: bool


@dataclass(frozen=True, slots=True)
class HltExit:
    """KVM_EXIT_HLT: the guest halted (no in-kernel irqchip, so HLT comes to us)."""


@dataclass(frozen=True, slots=True)
class ShutdownExit:
    """KVM_EXIT_SHUTDOWN: triple fault or similar; the vCPU cannot continue."""


@dataclass(frozen=True, slots=True)
class IrqWindowOpenExit:
    """KVM_EXIT_IRQ_WINDOW_OPEN: the guest can take an interrupt now."""


@dataclass(frozen=True, slots=True)
class InterruptedExit:
    """KVM_RUN returned early: a signal, ``immediate_exit`` or KVM_EXIT_INTR."""


@dataclass(frozen=True, slots=True)
class FailEntryExit:
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest."""

    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class InternalErrorExit:
    """KVM_EXIT_INTERNAL_ERROR, e.g. the instruction emulator gave up."""

    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SystemEventExit:
    """KVM_EXIT_SYSTEM_EVENT (shutdown/reset/crash requests)."""

    type: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class OtherExit:
    """Any exit reason this module does not model; ``reason`` is the raw number."""

    reason: int
    hardware_exit_reason: int


VcpuExit = (
    IoExit
    | MmioExit
    | HltExit
    | ShutdownExit
    | IrqWindowOpenExit
    | InterruptedExit
    | FailEntryExit
    | InternalErrorExit
    | SystemEventExit
    | OtherExit
)

# Stateless exits are shared singletons: decoding them allocates nothing.
_HLT = HltExit()
_SHUTDOWN = ShutdownExit()
_IRQ_WINDOW = IrqWindowOpenExit()
INTERRUPTED = InterruptedExit()


def decode_exit(run: abi.KvmRun) -> VcpuExit:
    """Build the typed exit for the reason currently in ``run``."""
    reason = run.exit_reason
    if reason == abi.KVM_EXIT_IO:
        io = run.io
        return IoExit(io.direction == abi.KVM_EXIT_IO_OUT, io.size, io.port, io.count, io.data_offset)
    if reason == abi.KVM_EXIT_HLT:
        return _HLT
    if reason == abi.KVM_EXIT_MMIO:
        mmio = run.mmio
        length = min(mmio.len, 8)
        return MmioExit(mmio.phys_addr, bytes(mmio.data[:length]), bool(mmio.is_write))
    if reason == abi.KVM_EXIT_INTR:
        return INTERRUPTED
    if reason == abi.KVM_EXIT_IRQ_WINDOW_OPEN:
        return _IRQ_WINDOW
    if reason == abi.KVM_EXIT_SHUTDOWN:
        return _SHUTDOWN
    if reason == abi.KVM_EXIT_FAIL_ENTRY:
        fail = run.fail_entry
        return FailEntryExit(fail.hardware_entry_failure_reason, fail.cpu)
    if reason == abi.KVM_EXIT_INTERNAL_ERROR:
        internal = run.internal
        ndata = min(internal.ndata, 16)
        return InternalErrorExit(internal.suberror, tuple(internal.data[:ndata]))
    if reason == abi.KVM_EXIT_SYSTEM_EVENT:
        event = run.system_event
        ndata = min(event.ndata, 16)
        return SystemEventExit(event.type, tuple(event.data[:ndata]))
    return OtherExit(reason, run.hw.hardware_exit_reason)
