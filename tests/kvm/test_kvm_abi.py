"""The ctypes KVM ABI against the kernel headers (compiled C oracle when available)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from transports.kvm import abi

# (C expression, Python value) pairs; the C side prints each expression.
_STRUCTS = {
    "kvm_run": abi.KvmRun,
    "kvm_regs": abi.KvmRegs,
    "kvm_sregs": abi.KvmSregs,
    "kvm_segment": abi.KvmSegment,
    "kvm_dtable": abi.KvmDtable,
    "kvm_cpuid_entry2": abi.KvmCpuidEntry2,
    "kvm_userspace_memory_region": abi.KvmUserspaceMemoryRegion,
    "kvm_interrupt": abi.KvmInterrupt,
    "kvm_translation": abi.KvmTranslation,
}
_IOCTLS = [
    "KVM_GET_API_VERSION",
    "KVM_CREATE_VM",
    "KVM_CHECK_EXTENSION",
    "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_GET_SUPPORTED_CPUID",
    "KVM_CREATE_VCPU",
    "KVM_SET_USER_MEMORY_REGION",
    "KVM_SET_TSS_ADDR",
    "KVM_SET_IDENTITY_MAP_ADDR",
    "KVM_RUN",
    "KVM_GET_REGS",
    "KVM_SET_REGS",
    "KVM_GET_SREGS",
    "KVM_SET_SREGS",
    "KVM_TRANSLATE",
    "KVM_INTERRUPT",
    "KVM_SET_CPUID2",
    "KVM_MEM_READONLY",
    "KVM_CAP_READONLY_MEM",
    "KVM_CAP_IMMEDIATE_EXIT",
    "KVM_CAP_SYNC_REGS",
    "KVM_EXIT_IO",
    "KVM_EXIT_MMIO",
    "KVM_EXIT_HLT",
    "KVM_EXIT_INTR",
    "KVM_EXIT_IRQ_WINDOW_OPEN",
    "KVM_EXIT_SHUTDOWN",
    "KVM_EXIT_FAIL_ENTRY",
    "KVM_EXIT_INTERNAL_ERROR",
    "KVM_EXIT_SYSTEM_EVENT",
    "KVM_EXIT_IO_IN",
    "KVM_EXIT_IO_OUT",
]
# kvm_run members reached through the anonymous exit union.
_RUN_FIELDS = [
    "request_interrupt_window",
    "immediate_exit",
    "exit_reason",
    "ready_for_interrupt_injection",
    "if_flag",
    "flags",
    "cr8",
    "apic_base",
    "io.direction",
    "io.size",
    "io.port",
    "io.count",
    "io.data_offset",
    "mmio.phys_addr",
    "mmio.data",
    "mmio.len",
    "mmio.is_write",
    "fail_entry.hardware_entry_failure_reason",
    "fail_entry.cpu",
    "internal.suberror",
    "internal.ndata",
    "internal.data",
    "system_event.type",
    "system_event.data",
    "kvm_valid_regs",
    "kvm_dirty_regs",
    "s",
]


def _python_offset(path: str) -> int:
    if path == "s":
        return abi.KVM_RUN_SYNC_REGS_OFFSET
    offset = 0
    cls: type[Any] = abi.KvmRun
    for part in path.split("."):
        if cls is abi.KvmRun and part in {f[0] for f in abi.KvmRunExit._fields_}:
            offset += abi.KvmRun.u.offset
            cls = abi.KvmRunExit
        offset += getattr(cls, part).offset
        cls = next(f[1] for f in cls._fields_ if f[0] == part)
    return offset


def _python_fields(struct: type[ctypes.Structure]) -> list[str]:
    return [name for name, *_ in struct._fields_ if name not in ("padding", "padding1", "pad", "u")]


def test_sizes_match_the_uapi_headers() -> None:
    # Numbers from include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h (x86-64).
    assert ctypes.sizeof(abi.KvmRegs) == 144
    assert ctypes.sizeof(abi.KvmSegment) == 24
    assert ctypes.sizeof(abi.KvmDtable) == 16
    assert ctypes.sizeof(abi.KvmSregs) == 312
    assert ctypes.sizeof(abi.KvmCpuidEntry2) == 40
    assert ctypes.sizeof(abi.KvmUserspaceMemoryRegion) == 32
    assert ctypes.sizeof(abi.KvmTranslation) == 24
    assert abi.KvmRun.u.offset == 32
    assert abi.KvmRun.kvm_valid_regs.offset == 288
    assert abi.KVM_RUN == 0xAE80
    assert abi.KVM_GET_REGS == 0x8090AE81
    assert abi.KVM_SET_SREGS == 0x4138AE84
    assert abi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert abi.KVM_GET_SUPPORTED_CPUID == 0xC008AE05


@pytest.mark.skipif(
    shutil.which("cc") is None or not Path("/usr/include/linux/kvm.h").exists(),
    reason="needs a C compiler and the kernel UAPI headers (linux-libc-dev)",
)
def test_layout_matches_a_compiled_oracle(tmp_path: Path) -> None:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for name in _IOCTLS:
        lines.append(f'printf("{name} %lu\\n", (unsigned long)({name}));')
    for cname, struct in _STRUCTS.items():
        lines.append(f'printf("sizeof {cname} %zu\\n", sizeof(struct {cname}));')
        if struct is not abi.KvmRun:
            for field in _python_fields(struct):
                lines.append(f'printf("offsetof {cname}.{field} %zu\\n", offsetof(struct {cname}, {field}));')
    for field in _RUN_FIELDS:
        lines.append(f'printf("offsetof kvm_run.{field} %zu\\n", offsetof(struct kvm_run, {field}));')
    lines += ["return 0;", "}"]
    source = tmp_path / "oracle.c"
    source.write_text("\n".join(lines))
    binary = tmp_path / "oracle"
    subprocess.run(["cc", "-o", str(binary), str(source)], check=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout

    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        name, _, value_text = rest.rpartition(" ")
        value = int(value_text)
        if kind == "sizeof":
            struct = _STRUCTS[name]
            if struct is abi.KvmRun:
                # Our KvmRun stops before the sync-regs area on purpose.
                assert value >= abi.KVM_RUN_SYNC_REGS_OFFSET
            else:
                assert ctypes.sizeof(struct) == value, name
        elif kind == "offsetof":
            cname, _, field = name.partition(".")
            if cname == "kvm_run":
                assert _python_offset(field) == value, name
            else:
                assert getattr(_STRUCTS[cname], field).offset == value, name
        else:
            assert getattr(abi, kind) == int(rest), kind
