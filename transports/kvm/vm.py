"""A minimal KVM virtual machine: memfd-backed memory slots and vCPUs.

Only what a port-I/O device framework needs: no in-kernel irqchip, no PIT,
one address space. Every call is a plain blocking ioctl; ``Vcpu.run`` releases
the GIL while the guest runs, so vCPUs can run on their own threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import signal
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from dispatcher import DispatchError

from . import abi
from .exits import INTERRUPTED, IoExit, VcpuExit, decode_exit

__all__ = [
    "KICK_SIGNAL",
    "PAGE_SIZE",
    "KvmError",
    "KvmUnavailableError",
    "MemorySlot",
    "Vcpu",
    "Vm",
    "install_kick_handler",
    "kvm_available",
]

PAGE_SIZE: Final = mmap.PAGESIZE
KVM_PATH: Final = "/dev/kvm"

# The real-time signal used to knock a vCPU thread out of KVM_RUN. SIGRTMIN is
# what glibc leaves for applications after its own reserved ones.
KICK_SIGNAL: Final = signal.SIGRTMIN

# Placed just under 4 GiB like QEMU does; only VMX without unrestricted-guest
# uses them, but setting them is harmless elsewhere. No RAM may overlap them.
_TSS_ADDR: Final = 0xFFFB_D000
_IDENTITY_MAP_ADDR: Final = 0xFFFB_C000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int


class KvmError(DispatchError):
    """A KVM operation failed."""


class KvmUnavailableError(KvmError):
    """``/dev/kvm`` cannot be opened or speaks an unknown API version."""


def _ioctl_ulong(fd: int, request: int, value: int) -> int:
    # fcntl.ioctl takes a C int; some KVM ioctls take an unsigned long value.
    ret: int = _libc.ioctl(fd, request, value)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _open_kvm(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise KvmUnavailableError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        version = fcntl.ioctl(fd, abi.KVM_GET_API_VERSION, 0)
    except OSError as exc:
        os.close(fd)
        raise KvmUnavailableError(f"{path}: KVM_GET_API_VERSION failed: {exc.strerror}") from exc
    if version != abi.KVM_API_VERSION:
        os.close(fd)
        raise KvmUnavailableError(f"{path}: KVM API version {version}, expected {abi.KVM_API_VERSION}")
    return fd


def kvm_available(path: str = KVM_PATH) -> str | None:
    """Return ``None`` if KVM is usable, else a human-readable reason (for skips)."""
    try:
        fd = _open_kvm(path)
    except KvmUnavailableError as exc:
        return str(exc)
    os.close(fd)
    return None


def _noop_handler(signum: int, frame: object) -> None:
    """Exists only so the kick signal interrupts syscalls instead of killing us."""


def install_kick_handler(signum: int = KICK_SIGNAL) -> None:
    """Make ``signum`` harmless so it can interrupt ``KVM_RUN``; main thread only.

    A handler someone else installed is kept: any Python handler is enough.
    """
    current = signal.getsignal(signum)
    if current in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(signum, _noop_handler)


def _kick_handler_installed(signum: int) -> bool:
    return signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN, None)


@dataclass(eq=False)
class MemorySlot:
    """One KVM memory slot backed by a memfd (shareable with another process).

    ``mem`` is the VMM's read-write mapping; a ``readonly`` slot is read-only
    only for the guest (each guest write is an :class:`MmioExit`).
    """

    slot: int
    guest_phys_addr: int
    size: int
    readonly: bool
    name: str
    fd: int
    mem: mmap.mmap

    @property
    def end(self) -> int:
        """First guest-physical address after the region."""
        return self.guest_phys_addr + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        """True if ``[gpa, gpa+length)`` lies inside this region."""
        return self.guest_phys_addr <= gpa and gpa + length <= self.end


class Vm:
    """A KVM virtual machine. Use as a context manager or call ``close``."""

    def __init__(self, path: str = KVM_PATH) -> None:
        self._kvm_fd = _open_kvm(path)
        self._fd = -1
        self._regions: list[MemorySlot] = []
        self._vcpus: list[Vcpu] = []
        self._next_slot = 0
        self._supported_cpuid: ctypes.Structure | None = None
        try:
            self._fd = fcntl.ioctl(self._kvm_fd, abi.KVM_CREATE_VM, 0)
            self.vcpu_mmap_size: int = fcntl.ioctl(self._kvm_fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0)
            if self.check_extension(abi.KVM_CAP_SET_TSS_ADDR):
                _ioctl_ulong(self._fd, abi.KVM_SET_TSS_ADDR, _TSS_ADDR)
            if self.check_extension(abi.KVM_CAP_SET_IDENTITY_MAP_ADDR):
                fcntl.ioctl(self._fd, abi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(_IDENTITY_MAP_ADDR))
        except OSError as exc:
            self.close()
            raise KvmError(f"creating the VM failed: {exc}") from exc

    # --- lifetime ---

    def close(self) -> None:
        """Close vCPUs, the VM and its memory. Idempotent."""
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        # Memory goes after the VM fd so KVM never sees a slot without backing.
        for region in self._regions:
            _close_mmap(region.mem)
            os.close(region.fd)
        self._regions.clear()
        if self._kvm_fd >= 0:
            os.close(self._kvm_fd)
            self._kvm_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def fd(self) -> int:
        """The VM file descriptor."""
        return self._fd

    @property
    def kvm_fd(self) -> int:
        """The ``/dev/kvm`` file descriptor this VM was created from (system ioctls: MSR lists, capabilities)."""
        return self._kvm_fd

    @property
    def closed(self) -> bool:
        """True once ``close`` ran."""
        return self._fd < 0

    # --- capabilities ---

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on /dev/kvm: 0 if unsupported, else a cap-specific value."""
        result: int = fcntl.ioctl(self._kvm_fd, abi.KVM_CHECK_EXTENSION, cap)
        return result

    def supported_cpuid(self) -> ctypes.Structure:
        """``KVM_GET_SUPPORTED_CPUID`` as a ``kvm_cpuid2`` structure (cached)."""
        if self._supported_cpuid is None:
            nent = 64
            while True:
                cpuid = abi.kvm_cpuid2_type(nent)()
                cpuid.nent = nent
                try:
                    fcntl.ioctl(self._kvm_fd, abi.KVM_GET_SUPPORTED_CPUID, cpuid)
                except OSError as exc:
                    if exc.errno == errno.E2BIG and nent < 4096:
                        nent *= 2
                        continue
                    raise KvmError(f"KVM_GET_SUPPORTED_CPUID failed: {exc}") from exc
                break
            self._supported_cpuid = cpuid
        return self._supported_cpuid

    # --- memory ---

    @property
    def regions(self) -> tuple[MemorySlot, ...]:
        """The memory slots, in creation order."""
        return tuple(self._regions)

    def add_ram(self, guest_phys_addr: int, size: int, *, name: str = "ram") -> MemorySlot:
        """Map ``size`` bytes of zeroed, guest-writable RAM at ``guest_phys_addr``."""
        return self._add_region(guest_phys_addr, size, readonly=False, name=name)

    def add_rom(self, guest_phys_addr: int, image: bytes, *, size: int | None = None, name: str = "rom") -> MemorySlot:
        """Map a guest-read-only region holding ``image`` (padded to ``size``, default a page multiple).

        Needs ``KVM_CAP_READONLY_MEM``; guest writes to it exit as ``MmioExit``.
        """
        if not self.check_extension(abi.KVM_CAP_READONLY_MEM):
            raise KvmError("this KVM does not support read-only memory slots (KVM_CAP_READONLY_MEM)")
        if size is None:
            size = max(PAGE_SIZE, -(-len(image) // PAGE_SIZE) * PAGE_SIZE)
        if len(image) > size:
            raise ValueError(f"ROM image of {len(image)} bytes does not fit in {size} bytes")
        region = self._add_region(guest_phys_addr, size, readonly=True, name=name, image=image)
        return region

    def _add_region(self, gpa: int, size: int, *, readonly: bool, name: str, image: bytes = b"") -> MemorySlot:
        if self.closed:
            raise KvmError("the VM is closed")
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise ValueError(f"region {name!r}: address {gpa:#x} and size {size:#x} must be page multiples")
        for other in self._regions:
            if gpa < other.end and other.guest_phys_addr < gpa + size:
                raise ValueError(f"region {name!r} at {gpa:#x}+{size:#x} overlaps {other.name!r}")
        fd = os.memfd_create(f"kvm-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            mem = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        if image:
            mem[: len(image)] = image
        # Take the mapping's address through a throwaway ctypes view: a live view
        # would pin the mmap and make close() fail.
        view = ctypes.c_char.from_buffer(mem)
        address = ctypes.addressof(view)
        del view
        slot = self._next_slot
        desc = abi.KvmUserspaceMemoryRegion(
            slot=slot,
            flags=abi.KVM_MEM_READONLY if readonly else 0,
            guest_phys_addr=gpa,
            memory_size=size,
            userspace_addr=address,
        )
        try:
            fcntl.ioctl(self._fd, abi.KVM_SET_USER_MEMORY_REGION, desc)
        except OSError as exc:
            mem.close()
            os.close(fd)
            raise KvmError(f"KVM_SET_USER_MEMORY_REGION for {name!r} failed: {exc}") from exc
        self._next_slot += 1
        region = MemorySlot(slot, gpa, size, readonly, name, fd, mem)
        self._regions.append(region)
        return region

    def _pieces(self, gpa: int, length: int) -> list[tuple[MemorySlot, int, int]]:
        """Split ``[gpa, gpa+length)`` into (region, offset, length) pieces; all must be mapped."""
        pieces: list[tuple[MemorySlot, int, int]] = []
        while length > 0:
            for region in self._regions:
                if region.guest_phys_addr <= gpa < region.end:
                    chunk = min(length, region.end - gpa)
                    pieces.append((region, gpa - region.guest_phys_addr, chunk))
                    gpa += chunk
                    length -= chunk
                    break
            else:
                raise ValueError(f"guest-physical address {gpa:#x} is not backed by any region")
        return pieces

    def read_memory(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes of guest-physical memory starting at ``gpa``."""
        return b"".join(region.mem[off : off + n] for region, off, n in self._pieces(gpa, length))

    def write_memory(self, gpa: int, data: bytes) -> None:
        """Write ``data`` to guest-physical memory (ROM too: the VMM may always write)."""
        pos = 0
        for region, off, n in self._pieces(gpa, len(data)):
            region.mem[off : off + n] = data[pos : pos + n]
            pos += n

    # --- vCPUs ---

    @property
    def vcpus(self) -> tuple[Vcpu, ...]:
        """The vCPUs, in creation order."""
        return tuple(self._vcpus)

    def create_vcpu(self, index: int | None = None) -> Vcpu:
        """Create a vCPU (``index`` defaults to the next free one) with the host-supported CPUID."""
        if self.closed:
            raise KvmError("the VM is closed")
        vcpu = Vcpu(self, len(self._vcpus) if index is None else index)
        self._vcpus.append(vcpu)
        return vcpu


def _close_mmap(mem: mmap.mmap) -> None:
    # If someone still holds a memoryview/ctypes view, the mapping lives until
    # that view is garbage-collected; nothing else leaks.
    with contextlib.suppress(BufferError):
        mem.close()


class Vcpu:
    """One virtual CPU: registers, ``run()`` and interrupt helpers.

    ``run`` may be called from any single thread at a time; ``kick`` may be
    called from any other thread to make a running or about-to-run
    ``KVM_RUN`` return ``InterruptedExit``.
    """

    def __init__(self, vm: Vm, index: int) -> None:
        self.index = index
        self._kick_signal = KICK_SIGNAL
        if threading.current_thread() is threading.main_thread():
            install_kick_handler(self._kick_signal)
        try:
            self._fd: int = fcntl.ioctl(vm.fd, abi.KVM_CREATE_VCPU, index)
        except OSError as exc:
            raise KvmError(f"KVM_CREATE_VCPU {index} failed: {exc}") from exc
        try:
            self._run_map = mmap.mmap(
                self._fd, vm.vcpu_mmap_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError:
            os.close(self._fd)
            raise
        self.kvm_run: abi.KvmRun = abi.KvmRun.from_buffer(self._run_map)
        self._runner: int | None = None
        self._runner_lock = threading.Lock()
        self.set_cpuid(vm.supported_cpuid())

    @property
    def fd(self) -> int:
        """The vCPU file descriptor."""
        return self._fd

    @property
    def run_map(self) -> mmap.mmap:
        """The vCPU's shared ``kvm_run`` mapping (header, sync registers, then the I/O data page)."""
        return self._run_map

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the vCPU fd. Idempotent."""
        if self._fd < 0:
            return
        del self.kvm_run
        _close_mmap(self._run_map)
        os.close(self._fd)
        self._fd = -1

    # --- registers ---

    def get_regs(self) -> abi.KvmRegs:
        """``KVM_GET_REGS``."""
        regs = abi.KvmRegs()
        fcntl.ioctl(self._fd, abi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: abi.KvmRegs) -> None:
        """``KVM_SET_REGS``. Not between an I/O exit and the next ``run`` (see docs/KVM.md)."""
        fcntl.ioctl(self._fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.KvmSregs:
        """``KVM_GET_SREGS``."""
        sregs = abi.KvmSregs()
        fcntl.ioctl(self._fd, abi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: abi.KvmSregs) -> None:
        """``KVM_SET_SREGS``."""
        fcntl.ioctl(self._fd, abi.KVM_SET_SREGS, sregs)

    def set_cpuid(self, cpuid: ctypes.Structure) -> None:
        """``KVM_SET_CPUID2``; long mode needs at least the LM bit from here."""
        fcntl.ioctl(self._fd, abi.KVM_SET_CPUID2, cpuid)

    # --- running ---

    def run(self) -> VcpuExit:
        """Enter the guest until the next exit; return it decoded."""
        with self._runner_lock:
            self._runner = threading.get_ident()
        try:
            fcntl.ioctl(self._fd, abi.KVM_RUN)  # no third argument: an int one costs two failed buffer lookups
        except InterruptedError:
            # A kick (signal and/or immediate_exit) arrived; clear it so the
            # next run() enters the guest again.
            self.kvm_run.immediate_exit = 0
            return INTERRUPTED
        finally:
            with self._runner_lock:
                self._runner = None
        return decode_exit(self.kvm_run)

    def bind_thread(self) -> None:
        """Have :meth:`kick` signal the calling thread from now on, inside ``run`` or not.

        For a thread that enters ``KVM_RUN`` itself, without :meth:`run`
        (see :mod:`transports.kvm.runner`); :meth:`unbind_thread` undoes it.
        """
        with self._runner_lock:
            self._runner = threading.get_ident()

    def unbind_thread(self) -> None:
        """Undo :meth:`bind_thread`: :meth:`kick` signals only a thread inside :meth:`run` again."""
        with self._runner_lock:
            self._runner = None

    def complete_pending_io(self) -> None:
        """Let KVM finish a pending IN/INS without running guest code.

        Uses ``immediate_exit``: KVM completes the instruction (RAX/memory,
        RIP) and returns at once. Needed before ``set_regs`` after an I/O exit.
        """
        self.kvm_run.immediate_exit = 1
        try:
            fcntl.ioctl(self._fd, abi.KVM_RUN)
        except InterruptedError:
            pass
        finally:
            self.kvm_run.immediate_exit = 0

    def kick(self) -> None:
        """Make ``run`` return ``InterruptedExit`` soon; safe from any thread.

        Sets ``immediate_exit`` (covers a thread about to enter KVM_RUN) and
        signals the thread inside ``run`` (covers one already in the guest).
        """
        if self._fd < 0:
            return
        if not _kick_handler_installed(self._kick_signal):
            raise KvmError(
                f"signal {self._kick_signal} has no handler; call install_kick_handler() from the main thread"
            )
        self.kvm_run.immediate_exit = 1
        with self._runner_lock:
            if self._runner is not None:
                signal.pthread_kill(self._runner, self._kick_signal)

    # --- port I/O data ---

    def read_io_data(self, exit: IoExit) -> bytes:
        """The ``count*size`` data bytes of an I/O exit (what OUT/OUTS wrote)."""
        start = exit.data_offset
        return self._run_map[start : start + exit.size * exit.count]

    def write_io_data(self, exit: IoExit, data: bytes) -> None:
        """Supply the bytes an IN/INS reads; KVM consumes them on the next ``run``."""
        expected = exit.size * exit.count
        if len(data) != expected:
            raise ValueError(f"I/O exit wants {expected} bytes, got {len(data)}")
        start = exit.data_offset
        self._run_map[start : start + expected] = data

    def complete_mmio_read(self, data: bytes) -> None:
        """Supply the bytes a guest MMIO read (``MmioExit`` with ``is_write`` False) returns."""
        if len(data) > 8:
            raise ValueError("an MMIO exit carries at most 8 bytes")
        mmio = self.kvm_run.mmio
        for i, byte in enumerate(data):
            mmio.data[i] = byte

    # --- address translation ---

    def translate(self, linear_address: int) -> int | None:
        """Guest-physical address for ``linear_address`` under the current paging, or None if unmapped."""
        tr = abi.KvmTranslation(linear_address=linear_address)
        fcntl.ioctl(self._fd, abi.KVM_TRANSLATE, tr)
        return int(tr.physical_address) if tr.valid else None

    # --- interrupts ---

    @property
    def request_interrupt_window(self) -> bool:
        """When set, KVM exits with ``IrqWindowOpenExit`` as soon as the guest can take an interrupt."""
        return bool(self.kvm_run.request_interrupt_window)

    @request_interrupt_window.setter
    def request_interrupt_window(self, value: bool) -> None:
        self.kvm_run.request_interrupt_window = 1 if value else 0

    @property
    def ready_for_interrupt_injection(self) -> bool:
        """KVM's view after the last exit: ``inject_interrupt`` would be taken now."""
        return bool(self.kvm_run.ready_for_interrupt_injection)

    @property
    def if_flag(self) -> bool:
        """RFLAGS.IF as of the last exit."""
        return bool(self.kvm_run.if_flag)

    def inject_interrupt(self, vector: int) -> None:
        """``KVM_INTERRUPT``: queue external interrupt ``vector`` (no in-kernel irqchip)."""
        if not 0 <= vector <= 255:
            raise ValueError(f"interrupt vector {vector} out of range")
        fcntl.ioctl(self._fd, abi.KVM_INTERRUPT, abi.KvmInterrupt(irq=vector))
