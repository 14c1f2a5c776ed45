"""A stopped KVM VM in one file: its vCPUs' state, the VM's clock, every memory slot, and what the VMM adds.

::

    save_snapshot(path, vm, machine={"kind": "pc", ...}, devices=save_devices(router))   # every vCPU stopped
    snapshot = Snapshot.open(path)                  # checks the whole header; raises SnapshotError
    vm = ...                                        # the same slots (names, addresses, sizes) and vCPUs
    snapshot.load_memory(vm, verify=True)           # straight into the slots (verify: each against its CRC-32)
    snapshot.restore_cpus(vm)                       # before the vCPUs first run

What is saved of each vCPU: the general registers (``KVM_GET_REGS``), the
special registers (``KVM_GET_SREGS``), the FPU/SSE/AVX state
(``KVM_GET_XSAVE2`` or ``KVM_GET_XSAVE``, else ``KVM_GET_FPU``) and XCR0
(``KVM_GET_XCRS``), every MSR of ``KVM_GET_MSR_INDEX_LIST`` the vCPU
reads, the pending events (exception, interrupt, NMI, interrupt shadow:
``KVM_GET_VCPU_EVENTS``), the debug registers, the multiprocessing state
and the CPUID the guest sees; of the VM, the kvmclock (``KVM_GET_CLOCK``)
and the TSC frequency. A restore sets the MSRs whose value differs from the
new vCPU's (the ones the guest set, and the TSC). This VMM creates no
in-kernel irqchip or PIT: interrupt controllers and timers are device
models, saved with the devices (``devices``).

A vCPU must be stopped (no thread in ``KVM_RUN``): :func:`save_snapshot`
first lets KVM finish an I/O instruction it exited for
(:func:`finish_pending_io`), as the snapshot cannot hold KVM's record of
it. The file format (version :data:`FORMAT_VERSION`) is described in
docs/SNAPSHOT.md: a 24-byte prefix, a JSON header, then each memory slot's
bytes at a page-aligned offset.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import errno
import fcntl
import json
import os
import struct
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dispatcher import DispatchError

from . import abi
from .vm import KvmError, MemorySlot, Vcpu, Vm

__all__ = [
    "ALIGN",
    "FORMAT",
    "FORMAT_VERSION",
    "MAGIC",
    "PREFIX",
    "CorruptSnapshotError",
    "IncompatibleSnapshotError",
    "RegionRecord",
    "Snapshot",
    "SnapshotError",
    "TruncatedSnapshotError",
    "capture_vcpu",
    "capture_vm",
    "finish_pending_io",
    "restore_vcpu",
    "restore_vm",
    "save_snapshot",
]

MAGIC: Final = b"\x89IDSNAP\n"
"""The first 8 bytes of a snapshot file."""
FORMAT: Final = "intercept-dispatch snapshot"
"""The header's ``format`` value."""
FORMAT_VERSION: Final = 1
"""The format version this module writes and reads."""
PREFIX: Final = struct.Struct("<8sIIII")
"""The file's first 24 bytes: magic, format version, header length, the header's CRC-32, reserved (0); little-endian."""
ALIGN: Final = 4096
"""Each memory slot's bytes start at a multiple of this offset in the file."""
_CHUNK = 8 << 20  # bytes per read when loading a slot: its CRC runs on another thread while the next chunk is read
_VCPU_EVENTS_FLAGS = 0x14  # offsetof(struct kvm_vcpu_events, flags)
_VALID_NMI_PENDING, _VALID_SIPI_VECTOR = 0x1, 0x2
_REG_NAMES = tuple(field[0] for field in abi.KvmRegs._fields_)


class SnapshotError(DispatchError):
    """A snapshot cannot be written, read or applied; ``path``, ``offset`` and ``field`` say where (when known)."""

    def __init__(self, message: str, *, path: str = "", offset: int | None = None, field: str = "") -> None:
        where = [part for part in (path, f"offset {offset}" if offset is not None else "", field) if part]
        super().__init__(f"{': '.join(where)}: {message}" if where else message)
        self.reason = message
        self.path = path
        self.offset = offset
        self.field = field


class TruncatedSnapshotError(SnapshotError):
    """The file ends before the bytes its prefix or header promise."""


class CorruptSnapshotError(SnapshotError):
    """Bytes of the file are not what was written: bad magic, header CRC, JSON, a field's value, a slot's CRC."""


class IncompatibleSnapshotError(SnapshotError):
    """A sound snapshot that does not fit here: another format version, other memory slots, a state KVM refuses."""


# -- vCPU and VM state -------------------------------------------------------------------------


def _b64(data: bytes | ctypes.Array[ctypes.c_char] | ctypes.Structure) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def _get(fd: int, request: int, buffer: ctypes.Structure | ctypes.Array[Any], what: str) -> None:
    try:
        fcntl.ioctl(fd, request, buffer)
    except OSError as error:
        raise KvmError(f"{what} failed: {error.strerror or error}") from None


def _set(fd: int, request: int, buffer: ctypes.Structure | ctypes.Array[Any], what: str, field: str) -> None:
    try:
        fcntl.ioctl(fd, request, buffer)
    except OSError as error:
        raise IncompatibleSnapshotError(f"KVM refused it ({what}: {error.strerror or error})", field=field) from None


def finish_pending_io(vcpu: Vcpu) -> None:
    """Let KVM finish the I/O instruction the vCPU last exited for, running no guest code (``immediate_exit``).

    KVM completes an IN, OUT or string I/O chunk (RIP, RAX, memory) only at
    the next ``KVM_RUN`` and keeps no record of it that a snapshot could
    hold. Raises :class:`SnapshotError` if the instruction cannot finish
    without a device (a string I/O instruction with more chunks to go).
    """
    run = vcpu.kvm_run
    for _ in range(64):
        run.immediate_exit = 1
        try:
            fcntl.ioctl(vcpu.fd, abi.KVM_RUN)
        except InterruptedError:
            return
        except OSError as error:
            raise KvmError(f"VP {vcpu.index}: KVM_RUN to finish the pending I/O failed: {error}") from None
        finally:
            run.immediate_exit = 0
        if run.exit_reason == abi.KVM_EXIT_MMIO:
            if not run.mmio.is_write:  # finishing an INS into unbacked memory: reads float high
                for i in range(min(run.mmio.len, 8)):
                    run.mmio.data[i] = 0xFF
            continue
        raise SnapshotError(
            f"VP {vcpu.index} cannot stop between instructions: finishing its I/O gave exit {run.exit_reason} "
            "(a string I/O instruction with more to do)"
        )
    raise SnapshotError(f"VP {vcpu.index}: its pending I/O did not finish in 64 rounds")


_msr_lists: dict[int, tuple[int, ...]] = {}
_msr_lock = threading.Lock()


def _msr_indices(vm: Vm) -> tuple[int, ...]:
    # KVM_GET_MSR_INDEX_LIST names what KVM saves and restores; some are absent on a given CPU, so each one a
    # vCPU cannot read is left out (the list is the same for every VM of this process, hence the cache).
    with _msr_lock:
        cached = _msr_lists.get(0)
        if cached is not None:
            return cached
        count = 256
        while True:
            listing = abi.kvm_msr_list_type(count)()
            listing.nmsrs = count
            try:
                fcntl.ioctl(vm.kvm_fd, abi.KVM_GET_MSR_INDEX_LIST, listing)
                break
            except OSError as error:
                if error.errno == errno.E2BIG and count < 65536:
                    count = max(count * 2, listing.nmsrs)
                    continue
                raise KvmError(f"KVM_GET_MSR_INDEX_LIST failed: {error.strerror or error}") from None
        indices = [int(listing.indices[i]) for i in range(listing.nmsrs)]
        probe = vm.vcpus[0]
        readable = tuple(index for index in indices if _read_msrs(probe, (index,)) is not None)
        _msr_lists[0] = readable
        return readable


def _read_msrs(vcpu: Vcpu, indices: Sequence[int]) -> list[int] | None:
    msrs = abi.kvm_msrs_type(len(indices))()
    msrs.nmsrs = len(indices)
    for i, index in enumerate(indices):
        msrs.entries[i].index = index
    try:
        got = fcntl.ioctl(vcpu.fd, abi.KVM_GET_MSRS, msrs)
    except OSError:
        return None
    return [int(msrs.entries[i].data) for i in range(len(indices))] if got == len(indices) else None


def _struct_to_json(value: Any) -> Any:
    if isinstance(value, ctypes.Structure):
        return {name: _struct_to_json(getattr(value, name)) for name, *_ in value._fields_ if name != "padding"}
    if isinstance(value, ctypes.Array):
        return [_struct_to_json(item) for item in value]
    return int(value)


def _struct_from_json(target: ctypes.Structure, value: Any, field: str) -> None:
    if not isinstance(value, dict):
        raise CorruptSnapshotError(f"expected an object, found {type(value).__name__}", field=field)
    for name, kind, *_ in target._fields_:
        if name == "padding":
            continue
        if name not in value:
            raise CorruptSnapshotError("missing", field=f"{field}.{name}")
        item = value[name]
        if isinstance(kind, type) and issubclass(kind, ctypes.Structure):
            _struct_from_json(getattr(target, name), item, f"{field}.{name}")
        elif isinstance(kind, type) and issubclass(kind, ctypes.Array):
            array = getattr(target, name)
            if not isinstance(item, list) or len(item) != len(array):
                raise CorruptSnapshotError(f"expected a list of {len(array)} integers", field=f"{field}.{name}")
            for i, element in enumerate(item):
                element_type: Any = kind._type_
                array[i] = _unsigned(element, ctypes.sizeof(element_type) * 8, f"{field}.{name}[{i}]")
        else:
            setattr(target, name, _unsigned(item, ctypes.sizeof(kind) * 8, f"{field}.{name}"))


def _unsigned(value: Any, bits: int, field: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << bits:
        raise CorruptSnapshotError(f"{value!r} is not a {bits}-bit unsigned integer", field=field)
    return value


def _blob(state: Mapping[str, Any], key: str, field: str, size: int | None = None) -> bytes:
    text = state.get(key)
    if not isinstance(text, str):
        raise CorruptSnapshotError("missing or not a base64 string", field=f"{field}.{key}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CorruptSnapshotError("not valid base64", field=f"{field}.{key}") from None
    if size is not None and len(data) != size:
        raise CorruptSnapshotError(f"{len(data)} bytes, expected {size}", field=f"{field}.{key}")
    return data


def _xsave_size(vm: Vm) -> int:
    # KVM_CAP_XSAVE2 gives the size the vCPU's enabled features need (more than 4 KiB with AMX); 0: no XSAVE2.
    size = vm.check_extension(abi.KVM_CAP_XSAVE2)
    return max(size, abi.KVM_XSAVE_SIZE) if size else 0


def capture_vcpu(vm: Vm, vcpu: Vcpu) -> dict[str, Any]:
    """The state of a stopped vCPU as a JSON-able dict (see the module docstring)."""
    fd = vcpu.fd
    state: dict[str, Any] = {"index": vcpu.index}
    cpuid = abi.kvm_cpuid2_type(256)()
    cpuid.nent = 256
    _get(fd, abi.KVM_GET_CPUID2, cpuid, "KVM_GET_CPUID2")
    state["cpuid"] = [
        [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in list(cpuid.entries)[: cpuid.nent]
    ]
    regs = vcpu.get_regs()
    state["regs"] = {name: int(getattr(regs, name)) for name in _REG_NAMES}
    state["sregs"] = _struct_to_json(vcpu.get_sregs())
    xsave_size = _xsave_size(vm)
    if xsave_size:
        buffer = ctypes.create_string_buffer(xsave_size)
        _get(fd, abi.KVM_GET_XSAVE2, buffer, "KVM_GET_XSAVE2")
        state["xsave"] = _b64(buffer.raw)
    elif vm.check_extension(abi.KVM_CAP_XSAVE):
        buffer = ctypes.create_string_buffer(abi.KVM_XSAVE_SIZE)
        _get(fd, abi.KVM_GET_XSAVE, buffer, "KVM_GET_XSAVE")
        state["xsave"] = _b64(buffer.raw)
    else:
        buffer = ctypes.create_string_buffer(abi.KVM_FPU_SIZE)
        _get(fd, abi.KVM_GET_FPU, buffer, "KVM_GET_FPU")
        state["fpu"] = _b64(buffer.raw)
    if vm.check_extension(abi.KVM_CAP_XCRS):
        buffer = ctypes.create_string_buffer(abi.KVM_XCRS_SIZE)
        _get(fd, abi.KVM_GET_XCRS, buffer, "KVM_GET_XCRS")
        state["xcrs"] = _b64(buffer.raw)
    indices = _msr_indices(vm)
    values = _read_msrs(vcpu, indices) if indices else []
    if values is None:
        raise KvmError(f"VP {vcpu.index}: KVM_GET_MSRS failed for MSRs it read before")
    state["msrs"] = [[index, value] for index, value in zip(indices, values, strict=True)]
    buffer = ctypes.create_string_buffer(abi.KVM_VCPU_EVENTS_SIZE)
    _get(fd, abi.KVM_GET_VCPU_EVENTS, buffer, "KVM_GET_VCPU_EVENTS")
    state["events"] = _b64(buffer.raw)
    buffer = ctypes.create_string_buffer(abi.KVM_DEBUGREGS_SIZE)
    _get(fd, abi.KVM_GET_DEBUGREGS, buffer, "KVM_GET_DEBUGREGS")
    state["debugregs"] = _b64(buffer.raw)
    mp_state = abi.KvmMpState()
    _get(fd, abi.KVM_GET_MP_STATE, mp_state, "KVM_GET_MP_STATE")
    state["mp_state"] = int(mp_state.mp_state)
    return state


def restore_vcpu(vm: Vm, vcpu: Vcpu, state: Mapping[str, Any], *, field: str = "vcpu") -> None:
    """Give a vCPU that has not run yet the state :func:`capture_vcpu` returned.

    Everything is decoded and checked before the first ``ioctl``; a value
    KVM refuses raises :class:`IncompatibleSnapshotError` naming the field.
    """
    fd = vcpu.fd
    entries = state.get("cpuid")
    if not isinstance(entries, list) or not entries or len(entries) > 256:
        raise CorruptSnapshotError("missing, or not a list of 1..256 entries", field=f"{field}.cpuid")
    cpuid = abi.kvm_cpuid2_type(len(entries))()
    cpuid.nent = len(entries)
    for i, entry in enumerate(entries):
        where = f"{field}.cpuid[{i}]"
        if not isinstance(entry, list) or len(entry) != 7:
            raise CorruptSnapshotError("expected [function, index, flags, eax, ebx, ecx, edx]", field=where)
        target = cpuid.entries[i]
        for name, value in zip(("function", "index", "flags", "eax", "ebx", "ecx", "edx"), entry, strict=True):
            setattr(target, name, _unsigned(value, 32, f"{where}.{name}"))
    regs_state = state.get("regs")
    if not isinstance(regs_state, dict):
        raise CorruptSnapshotError("missing or not an object", field=f"{field}.regs")
    regs = abi.KvmRegs()
    for name in _REG_NAMES:
        setattr(regs, name, _unsigned(regs_state.get(name), 64, f"{field}.regs.{name}"))
    sregs = abi.KvmSregs()
    _struct_from_json(sregs, state.get("sregs"), f"{field}.sregs")
    fpu_key = "xsave" if "xsave" in state else "fpu"
    fpu = _blob(state, fpu_key, field, abi.KVM_FPU_SIZE if fpu_key == "fpu" else None)
    if fpu_key == "xsave" and len(fpu) < abi.KVM_XSAVE_SIZE:
        raise CorruptSnapshotError(f"{len(fpu)} bytes, at least {abi.KVM_XSAVE_SIZE} expected", field=f"{field}.xsave")
    xcrs = _blob(state, "xcrs", field, abi.KVM_XCRS_SIZE) if "xcrs" in state else None
    events = bytearray(_blob(state, "events", field, abi.KVM_VCPU_EVENTS_SIZE))
    debugregs = _blob(state, "debugregs", field, abi.KVM_DEBUGREGS_SIZE)
    mp_state = _unsigned(state.get("mp_state"), 32, f"{field}.mp_state")
    saved_msrs = state.get("msrs")
    if not isinstance(saved_msrs, list):
        raise CorruptSnapshotError("missing or not a list", field=f"{field}.msrs")
    msrs: list[tuple[int, int]] = []
    for i, pair in enumerate(saved_msrs):
        if not isinstance(pair, list) or len(pair) != 2:
            raise CorruptSnapshotError("expected [index, value]", field=f"{field}.msrs[{i}]")
        msrs.append((_unsigned(pair[0], 32, f"{field}.msrs[{i}][0]"), _unsigned(pair[1], 64, f"{field}.msrs[{i}][1]")))

    # The order QEMU uses: CPUID first (it decides which state is valid), then registers, FPU, XCRs, special
    # registers, MSRs, and the events last (an injected interrupt in the sregs bitmap is superseded by them).
    _set(fd, abi.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2", f"{field}.cpuid")
    _set(fd, abi.KVM_SET_REGS, regs, "KVM_SET_REGS", f"{field}.regs")
    if xcrs is not None and vm.check_extension(abi.KVM_CAP_XCRS):
        # XCR0 before the XSAVE area: KVM checks the area's features against it.
        _set(fd, abi.KVM_SET_XCRS, ctypes.create_string_buffer(xcrs, len(xcrs)), "KVM_SET_XCRS", f"{field}.xcrs")
    if fpu_key == "xsave":
        size = max(_xsave_size(vm), abi.KVM_XSAVE_SIZE)
        buffer = ctypes.create_string_buffer(fpu[:size].ljust(size, b"\0"), size)
        _set(fd, abi.KVM_SET_XSAVE, buffer, "KVM_SET_XSAVE", f"{field}.xsave")
    else:
        _set(fd, abi.KVM_SET_FPU, ctypes.create_string_buffer(fpu, len(fpu)), "KVM_SET_FPU", f"{field}.fpu")
    _set(fd, abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS", f"{field}.sregs")
    _restore_msrs(vcpu, msrs, field)
    _set(fd, abi.KVM_SET_MP_STATE, abi.KvmMpState(mp_state), "KVM_SET_MP_STATE", f"{field}.mp_state")
    flags = struct.unpack_from("<I", events, _VCPU_EVENTS_FLAGS)[0]
    struct.pack_into("<I", events, _VCPU_EVENTS_FLAGS, flags | _VALID_NMI_PENDING | _VALID_SIPI_VECTOR)
    buffer = ctypes.create_string_buffer(bytes(events), len(events))
    _set(fd, abi.KVM_SET_VCPU_EVENTS, buffer, "KVM_SET_VCPU_EVENTS", f"{field}.events")
    _set(fd, abi.KVM_SET_DEBUGREGS, ctypes.create_string_buffer(debugregs, len(debugregs)), "KVM_SET_DEBUGREGS",
         f"{field}.debugregs")  # fmt: skip


def _restore_msrs(vcpu: Vcpu, msrs: list[tuple[int, int]], field: str) -> None:
    # Only the MSRs whose value differs from the new vCPU's: those the guest (or time: the TSC) changed. Setting
    # the others back to their reset value is useless, and KVM refuses a few of them from user space.
    current = _read_msrs(vcpu, [index for index, _ in msrs]) if msrs else []
    if current is None:
        raise IncompatibleSnapshotError(
            "this vCPU cannot read every MSR the snapshot has (another CPU model or KVM)", field=f"{field}.msrs"
        )
    changed = [(index, value) for (index, value), now in zip(msrs, current, strict=True) if value != now]
    if not changed:
        return
    table = abi.kvm_msrs_type(len(changed))()
    table.nmsrs = len(changed)
    for i, (index, value) in enumerate(changed):
        table.entries[i].index, table.entries[i].data = index, value
    try:
        done = fcntl.ioctl(vcpu.fd, abi.KVM_SET_MSRS, table)
    except OSError as error:
        raise IncompatibleSnapshotError(
            f"KVM_SET_MSRS failed: {error.strerror or error}", field=f"{field}.msrs"
        ) from None
    if done != len(changed):
        index, value = changed[done]
        position = next(i for i, (saved, _) in enumerate(msrs) if saved == index)
        raise IncompatibleSnapshotError(f"KVM refused MSR {index:#x} = {value:#x}", field=f"{field}.msrs[{position}]")


def capture_vm(vm: Vm) -> dict[str, Any]:
    """The state of a VM whose vCPUs are all stopped: the clock, the TSC frequency and every vCPU."""
    state: dict[str, Any] = {}
    if vm.check_extension(abi.KVM_CAP_ADJUST_CLOCK):
        clock = abi.KvmClockData()
        _get(vm.fd, abi.KVM_GET_CLOCK, clock, "KVM_GET_CLOCK")
        state["kvmclock"] = int(clock.clock)
    try:
        state["tsc_khz"] = fcntl.ioctl(vm.vcpus[0].fd, abi.KVM_GET_TSC_KHZ, 0) if vm.vcpus else 0
    except OSError:
        state["tsc_khz"] = 0
    state["vcpus"] = [capture_vcpu(vm, vcpu) for vcpu in vm.vcpus]
    return state


def restore_vm(vm: Vm, state: Mapping[str, Any], *, field: str = "cpu") -> None:
    """Give a VM that has not run yet, with as many vCPUs, the state :func:`capture_vm` returned."""
    vcpus = state.get("vcpus")
    if not isinstance(vcpus, list):
        raise CorruptSnapshotError("missing or not a list", field=f"{field}.vcpus")
    if len(vcpus) != len(vm.vcpus):
        raise IncompatibleSnapshotError(
            f"the snapshot has {len(vcpus)} vCPUs, this VM {len(vm.vcpus)}", field=f"{field}.vcpus"
        )
    clock = state.get("kvmclock")
    if clock is not None:
        clock = _unsigned(clock, 64, f"{field}.kvmclock")
    for i, (vcpu, saved) in enumerate(zip(vm.vcpus, vcpus, strict=True)):
        if not isinstance(saved, dict):
            raise CorruptSnapshotError("not an object", field=f"{field}.vcpus[{i}]")
        restore_vcpu(vm, vcpu, saved, field=f"{field}.vcpus[{i}]")
    if clock is not None and vm.check_extension(abi.KVM_CAP_ADJUST_CLOCK):
        _set(vm.fd, abi.KVM_SET_CLOCK, abi.KvmClockData(clock=clock), "KVM_SET_CLOCK", f"{field}.kvmclock")


# -- the file --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegionRecord:
    """One memory slot in a snapshot file: where the guest sees it, and where its bytes are in the file."""

    name: str
    guest_phys_addr: int
    size: int
    readonly: bool
    offset: int
    crc32: int


def _crc_of(mem: memoryview) -> int:
    return zlib.crc32(mem)  # releases the GIL: runs beside the writes


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _header_bytes(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":"), sort_keys=True).encode()


def save_snapshot(
    path: str | os.PathLike[str],
    vm: Vm,
    *,
    machine: Mapping[str, Any],
    devices: Mapping[str, Any] | None = None,
    finish_io: bool = True,
) -> dict[str, Any]:
    """Write the VM (every vCPU stopped), ``machine`` (the VMM's own description) and ``devices`` to ``path``.

    ``machine`` and ``devices`` must be JSON-able. The file is written
    beside ``path`` and renamed over it when complete, so a reader never
    sees half a snapshot. With ``finish_io`` (the default) each vCPU first
    finishes the I/O instruction it stopped at (:func:`finish_pending_io`).
    Returns the header written.
    """
    if finish_io:
        for vcpu in vm.vcpus:
            finish_pending_io(vcpu)
    regions = vm.regions
    header: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "machine": dict(machine),
        "cpu": capture_vm(vm),
        "devices": dict(devices) if devices is not None else None,
        "regions": [],
    }
    # Offsets depend on the header's length, which must not depend on the CRCs: they are written as 8 hex
    # digits, a placeholder first, the values once computed (beside the writes, on another thread).
    records: list[dict[str, Any]] = [
        {"name": r.name, "guest_phys_addr": r.guest_phys_addr, "size": r.size, "readonly": r.readonly,
         "offset": 0, "crc32": "00000000"}
        for r in regions
    ]  # fmt: skip
    header["regions"] = records
    offset = _align(PREFIX.size + len(_header_bytes(header)) + 64 * len(records))
    for record, region in zip(records, regions, strict=True):
        record["offset"] = offset
        offset = _align(offset + region.size)
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise SnapshotError(f"cannot write the snapshot: {error.strerror or error}", path=str(partial)) from None
    try:
        with ThreadPoolExecutor(1) as pool:
            crcs = pool.map(_crc_of, [memoryview(region.mem) for region in regions])
            for record, region in zip(records, regions, strict=True):
                _write_all(fd, memoryview(region.mem), record["offset"])
            for record, crc in zip(records, crcs, strict=True):
                record["crc32"] = f"{crc:08x}"
        body = _header_bytes(header)
        first = records[0]["offset"] if records else _align(PREFIX.size + len(body))
        if PREFIX.size + len(body) > first:
            raise SnapshotError("the header outgrew the room kept for it (a bug)", path=str(target))
        prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, len(body), zlib.crc32(body), 0)
        _write_all(fd, memoryview(prefix + body), 0)
        os.ftruncate(fd, offset)
        os.close(fd)
        fd = -1
        _replace(partial, target)
    except OSError as error:
        raise SnapshotError(f"cannot write the snapshot: {error.strerror or error}", path=str(target)) from None
    finally:
        if fd >= 0:
            os.close(fd)
        if partial.exists():
            partial.unlink()
    return header


def _replace(partial: Path, target: Path) -> None:
    # Renaming over an older snapshot frees its pages, tens of milliseconds for a large one: a descriptor kept
    # open across the rename moves that to another thread, when it is closed there.
    try:
        old = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        old = -1
    try:
        os.replace(partial, target)
    finally:
        if old >= 0:
            threading.Thread(target=os.close, args=(old,), name="snapshot-release", daemon=True).start()


def _align(value: int) -> int:
    return -(-value // ALIGN) * ALIGN


def _expect(value: Any, kind: type | tuple[type, ...], field: str, path: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise CorruptSnapshotError(f"expected {names}, found {value!r:.60}", path=path, field=field)
    return value


class Snapshot:
    """A snapshot file, opened: its header checked, its memory read on demand. Use :meth:`open`."""

    def __init__(self, path: str, header: dict[str, Any], regions: tuple[RegionRecord, ...], size: int) -> None:
        self.path = path
        self.header = header
        """The whole JSON header (docs/SNAPSHOT.md)."""
        self.regions = regions
        self.size = size

    @property
    def machine(self) -> dict[str, Any]:
        """What the VMM that wrote it said about its machine (``machine`` of :func:`save_snapshot`)."""
        machine: dict[str, Any] = self.header["machine"]
        return machine

    @property
    def devices(self) -> dict[str, Any] | None:
        """The device state document, or None."""
        devices: dict[str, Any] | None = self.header["devices"]
        return devices

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Snapshot:
        """Read and check the prefix and the header; raises a :class:`SnapshotError` naming what is wrong and where."""
        name = str(path)
        try:
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                prefix = file.read(PREFIX.size)
                if len(prefix) < PREFIX.size:
                    raise TruncatedSnapshotError(
                        f"the file has {len(prefix)} bytes, fewer than the {PREFIX.size}-byte prefix", path=name,
                        offset=len(prefix), field="prefix",
                    )  # fmt: skip
                magic, version, length, crc, _ = PREFIX.unpack(prefix)
                if magic != MAGIC:
                    raise CorruptSnapshotError(f"not a snapshot file (it starts {magic!r})", path=name, offset=0,
                                               field="magic")  # fmt: skip
                if version != FORMAT_VERSION:
                    raise IncompatibleSnapshotError(
                        f"format version {version}; this program reads version {FORMAT_VERSION}", path=name,
                        offset=8, field="format_version",
                    )  # fmt: skip
                body = file.read(length)
        except OSError as error:
            raise SnapshotError(f"cannot read the snapshot: {error.strerror or error}", path=name) from None
        if len(body) < length:
            raise TruncatedSnapshotError(
                f"the header is {length} bytes but the file ends after {len(body)} of them", path=name,
                offset=PREFIX.size + len(body), field="header",
            )  # fmt: skip
        if zlib.crc32(body) != crc:
            raise CorruptSnapshotError(
                f"the header's CRC-32 is {zlib.crc32(body):08x}, the prefix says {crc:08x}", path=name,
                offset=PREFIX.size, field="header",
            )  # fmt: skip
        try:
            header = json.loads(body)
        except (UnicodeDecodeError, ValueError) as error:
            position = getattr(error, "pos", getattr(error, "start", 0))
            raise CorruptSnapshotError(
                f"the header is not JSON: {error}", path=name, offset=PREFIX.size + position, field="header"
            ) from None
        _expect(header, dict, "header", name)
        if header.get("format") != FORMAT:
            raise CorruptSnapshotError(f"{header.get('format')!r:.60}, expected {FORMAT!r}", path=name, field="format")
        if header.get("format_version") != FORMAT_VERSION:
            raise IncompatibleSnapshotError(
                f"{header.get('format_version')!r:.20}; this program reads {FORMAT_VERSION}", path=name,
                field="format_version",
            )  # fmt: skip
        _expect(header.get("machine"), dict, "machine", name)
        _expect(header.get("cpu"), dict, "cpu", name)
        _expect(header.get("devices"), (dict, type(None)), "devices", name)
        records = []
        end = PREFIX.size + length
        for i, record in enumerate(_expect(header.get("regions"), list, "regions", name)):
            field = f"regions[{i}]"
            _expect(record, dict, field, name)
            try:
                crc_value = int(_expect(record.get("crc32"), str, f"{field}.crc32", name), 16)
            except ValueError:
                raise CorruptSnapshotError("not 8 hex digits", path=name, field=f"{field}.crc32") from None
            parsed = RegionRecord(
                _expect(record.get("name"), str, f"{field}.name", name),
                _expect(record.get("guest_phys_addr"), int, f"{field}.guest_phys_addr", name),
                _expect(record.get("size"), int, f"{field}.size", name),
                _expect(record.get("readonly"), bool, f"{field}.readonly", name),
                _expect(record.get("offset"), int, f"{field}.offset", name),
                crc_value,
            )
            if parsed.offset < end or parsed.size <= 0:
                raise CorruptSnapshotError(
                    f"offset {parsed.offset} size {parsed.size} overlaps what comes before it", path=name,
                    field=f"{field}.offset",
                )  # fmt: skip
            if parsed.offset + parsed.size > size:
                raise TruncatedSnapshotError(
                    f"slot {parsed.name!r} needs bytes {parsed.offset}..{parsed.offset + parsed.size} but the file "
                    f"ends at {size}", path=name, offset=size, field=f"{field}",
                )  # fmt: skip
            end = parsed.offset + parsed.size
            records.append(parsed)
        return cls(name, header, tuple(records), size)

    def region(self, name: str) -> RegionRecord:
        """The record of the slot called ``name``."""
        for record in self.regions:
            if record.name == name:
                return record
        raise IncompatibleSnapshotError(f"no memory slot named {name!r}", path=self.path, field="regions")

    def read_region(self, name: str) -> bytes:
        """The bytes of one slot, checked against its CRC-32."""
        record = self.region(name)
        data = bytearray(record.size)
        self._read_into(record, memoryview(data), lambda view: None)
        self._check_crc(record, zlib.crc32(data))
        return bytes(data)

    def load_memory(self, vm: Vm, *, verify: bool = False) -> None:
        """Copy every slot into ``vm``'s slot of the same name, address, size and kind.

        With ``verify``, each slot's bytes are checked against its CRC-32 as
        they are read (a second thread computes it); a mismatch raises
        :class:`CorruptSnapshotError`. Without, as other VMMs do with guest
        memory, a changed byte goes unnoticed (the header is always checked,
        and a short file always found): the check costs about as much CPU as
        the copy.
        """
        slots = {slot.name: slot for slot in vm.regions}
        pairs: list[tuple[RegionRecord, MemorySlot]] = []
        for i, record in enumerate(self.regions):
            slot = slots.get(record.name)
            if slot is None or (slot.guest_phys_addr, slot.size, slot.readonly) != (
                record.guest_phys_addr, record.size, record.readonly
            ):  # fmt: skip
                have = f"{slot.guest_phys_addr:#x}+{slot.size:#x}" if slot is not None else "no such slot"
                raise IncompatibleSnapshotError(
                    f"slot {record.name!r} at {record.guest_phys_addr:#x}+{record.size:#x}: this VM has {have}",
                    path=self.path, field=f"regions[{i}]",
                )  # fmt: skip
            pairs.append((record, slot))
        if len(pairs) != len(vm.regions):
            extra = sorted(set(slots) - {record.name for record in self.regions})
            raise IncompatibleSnapshotError(f"this VM has slots the snapshot lacks: {extra}", path=self.path,
                                            field="regions")  # fmt: skip
        if not verify:
            for record, slot in pairs:
                self._read_into(record, memoryview(slot.mem), lambda view: None)
            return
        with ThreadPoolExecutor(1) as pool:
            for record, slot in pairs:
                crc = [0]

                def step(view: memoryview, crc: list[int] = crc) -> None:
                    crc[0] = zlib.crc32(view, crc[0])

                # Chunks are checked in order on the pool's one thread while the next chunk is read here.
                futures: list[Future[None]] = []

                def check(view: memoryview, futures: list[Future[None]] = futures, step: Any = step) -> None:
                    futures.append(pool.submit(step, view))

                self._read_into(record, memoryview(slot.mem), check)
                for future in futures:
                    future.result()
                self._check_crc(record, crc[0])

    def _read_into(self, record: RegionRecord, target: memoryview, chunk_read: Callable[[memoryview], None]) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise SnapshotError(f"cannot read the snapshot: {error.strerror or error}", path=self.path) from None
        try:
            done = 0
            while done < record.size:
                view = target[done : min(done + _CHUNK, record.size)]
                got = os.preadv(fd, [view], record.offset + done)
                if got <= 0:
                    raise TruncatedSnapshotError(
                        f"slot {record.name!r} ends early", path=self.path, offset=record.offset + done,
                        field=f"regions[{self.regions.index(record)}]",
                    )  # fmt: skip
                chunk_read(target[done : done + got])
                done += got
        except OSError as error:
            raise SnapshotError(f"cannot read the snapshot: {error.strerror or error}", path=self.path) from None
        finally:
            os.close(fd)

    def _check_crc(self, record: RegionRecord, crc: int) -> None:
        if crc != record.crc32:
            raise CorruptSnapshotError(
                f"slot {record.name!r} has CRC-32 {crc:08x}, the header says {record.crc32:08x}",
                path=self.path, offset=record.offset, field=f"regions[{self.regions.index(record)}].crc32",
            )  # fmt: skip

    def restore_cpus(self, vm: Vm) -> None:
        """Give ``vm``'s vCPUs (not run yet) and clock the saved state (:func:`restore_vm`)."""
        try:
            restore_vm(vm, self.header["cpu"])
        except SnapshotError as error:
            if not error.path:
                raise type(error)(error.reason, path=self.path, offset=error.offset, field=error.field) from None
            raise
