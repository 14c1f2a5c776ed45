"""One vCPU's thread: ``KVM_RUN`` in a loop, each port I/O exit handed to the event loop.

The thread does only what must happen beside ``KVM_RUN``: copy the exit's
state out of ``kvm_run``, wait for the completion when the guest must not
run on without it, apply it, and handle the exits that are not port I/O.
Everything that touches device models (building the intercept, the
dispatcher, interrupt acknowledge) runs on the event loop thread, in the
:class:`VcpuHost` that drives the runners
(:class:`~transports.kvm.transport.KvmTransport`).

Posted writes: a non-string ``OUT`` is complete as far as the guest can see
(KVM has advanced RIP, RAX is unchanged), so the thread re-enters the guest
at once and lets the loop dispatch the intercept behind it, like a posted
write on a PCI bus. The intercepts of one VP stay in order, so a later IN
sees every earlier OUT's effect; before it acknowledges an interrupt, halts
or stops, the thread waits until every posted write of its VP is complete
(a fence). The completion is still checked when it arrives: one that asks
for a state other than the one the guest already has stops the VP.
"""

from __future__ import annotations

import enum
import fcntl
import logging
import mmap
import queue
import struct
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from dispatcher import BufferMemory

from . import abi
from .intercept import Action, IoCapture, PendingIo, PostedOut
from .memory import LinearReader
from .syncregs import (
    CONTEXT_SIZE,
    EVENTS_OFFSET,
    REGS_OFFSET,
    REGS_STRUCT,
    SREGS_OFFSET,
    SYNC_ALL,
    CpuContext,
    parse_context,
    parse_events,
)
from .vm import MemorySlot, Vcpu

__all__ = ["StopReason", "VcpuHost", "VcpuRunner", "VcpuStop", "terminal_exit"]

log = logging.getLogger("intercept_dispatch.kvm")

_HEADER = struct.Struct("<8xIBBHQ")  # exit_reason, ready_for_interrupt_injection, if_flag, flags, cr8
_IO = struct.Struct("<BBHIQ")  # kvm_run.io at offset 32: direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # kvm_run.mmio at offset 32: phys_addr, data, len, is_write
_U64 = struct.Struct("<Q")
_VALID_REGS_OFFSET, _DIRTY_REGS_OFFSET = 288, 296
_REG_OFFSETS = tuple(REGS_OFFSET + 8 * i for i in (16, 0, 2, 4, 5))  # RIP, RAX, RCX, RSI, RDI
_RF = 1 << 16
_OUT = abi.KVM_EXIT_IO_OUT
_OUT_DX, _OUT_IMM = (0xEE, 0xEF), (b"\xe6", b"\xe7")
_EVENTS_END = EVENTS_OFFSET + 16
_RUN, _EXIT_IO, _EXIT_MMIO, _EXIT_HLT = abi.KVM_RUN, abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO, abi.KVM_EXIT_HLT
MAX_POSTED: Final = 2048  # posted writes in flight before the thread waits (back-pressure): two loop batches


class StopReason(enum.Enum):
    """Why a vCPU thread ended."""

    STOPPED = "stopped"  # the VMM asked (machine finished, timeout, watchdog)
    HALTED = "halted"  # HLT with nothing that could ever wake it (interrupts off, or no interrupt controller)
    SHUTDOWN = "shutdown"  # KVM_EXIT_SHUTDOWN: a triple fault
    FAIL_ENTRY = "fail-entry"  # KVM_EXIT_FAIL_ENTRY: the CPU refused the guest state
    INTERNAL_ERROR = "internal-error"  # KVM_EXIT_INTERNAL_ERROR, e.g. the emulator gave up
    SYSTEM_EVENT = "system-event"  # KVM_EXIT_SYSTEM_EVENT (reset, shutdown or crash request)
    REFUSED = "refused"  # a completion refused the instruction (PROTOCOL_ERROR, UNSUPPORTED, MEMORY_ERROR)
    ERROR = "error"  # anything else: an exit this VMM does not handle, an undecodable instruction, a bug


@dataclass(frozen=True, slots=True)
class VcpuStop:
    """How and where a vCPU thread ended."""

    vp_index: int
    reason: StopReason
    detail: str
    rip: int

    def __str__(self) -> str:
        return f"VP {self.vp_index}: {self.reason.value} at RIP {self.rip:#x}: {self.detail}"


class _Signal(enum.Enum):
    WAKE = "wake"  # to the vCPU thread: re-check the state (interrupt line, fence, stop)
    ACKNOWLEDGE = "acknowledge"  # to the loop: run the interrupt acknowledge cycle for this vCPU
    FINISHED = "finished"  # to the loop: this vCPU thread has ended


WAKE: Final = _Signal.WAKE
ACKNOWLEDGE: Final = _Signal.ACKNOWLEDGE
FINISHED: Final = _Signal.FINISHED


class VcpuHost(Protocol):
    """What a :class:`~transports.kvm.runner.VcpuRunner` needs from the loop side that drives it (a ``KvmTransport``).

    The runner's thread calls these; each must be safe from any thread.
    """

    def put(self, item: tuple[VcpuRunner, Any], *, urgent: bool = True) -> None:
        """Queue an item for the loop: an :class:`~transports.kvm.intercept.IoCapture` or an acknowledge request.

        A posted write is not ``urgent``: it may wait for a batch.
        """

    def wake_loop(self) -> None:
        """Have the loop look at its queue now (the runner waits for its posted writes)."""

    def runner_finished(self, runner: VcpuRunner) -> None:
        """The runner's thread has ended; ``runner.result`` says why."""


class VcpuRunner:
    """The thread of one vCPU; created and driven by a :class:`VcpuHost`.

    ``memory`` and ``regions`` are the VM's, for reading code and data at
    guest-linear addresses; ``out_rip_advanced`` says how this host's KVM
    reports an OUT (:func:`~transports.kvm.hostinfo.out_advances_rip`).
    """

    def __init__(
        self,
        host: VcpuHost,
        vcpu: Vcpu,
        *,
        memory: BufferMemory,
        regions: Sequence[MemorySlot],
        out_rip_advanced: bool,
        posted_writes: bool,
        takes_interrupts: bool,
    ) -> None:
        self.host = host
        self.vcpu = vcpu
        self.vp_index = vcpu.index
        self.regions = tuple(regions)
        self.out_rip_advanced = out_rip_advanced
        # Posting needs KVM to have finished the OUT at the exit (RIP past it), as kvm-pvm does.
        self.posting = posted_writes and out_rip_advanced
        self.takes_interrupts = takes_interrupts
        self.interrupt_level = False  # the INTR line into this vCPU, set on the loop thread
        self.window_requested = False  # KVM was asked to exit when the guest can take an interrupt
        self.reader = LinearReader(memory, self.regions, vcpu.translate)
        self.inbox: queue.SimpleQueue[Action | _Signal | int | None] = queue.SimpleQueue()
        self.in_flight: deque[PendingIo | PostedOut] = deque()  # loop thread only
        # Posted writes: ``posted`` is counted by this thread, ``completed`` by the loop.
        self.posted = 0
        self.completed = 0
        self.fencing = False
        self.halted = False
        self.in_guest = False
        self.stopping = False
        # One attribute, so the vCPU thread never reads the reason of one request with the detail of another.
        self.stop_request: tuple[StopReason, str] = (StopReason.STOPPED, "")
        self._stop_lock = threading.Lock()
        self._stop_taken = False
        self.result: VcpuStop | None = None
        self.context: CpuContext | None = None
        self.exits = 0
        self.mmio_reads = 0
        self.mmio_writes = 0
        self.generation = 0  # counts the distinct contexts seen: frame templates are keyed by it
        self._state_bytes = b""  # kvm_sregs and kvm_vcpu_events as of the last parse
        self._cs_base = 0
        self._linear_mask = 0xFFFF_FFFF
        self._events = (False, False)
        self._code_buffer: bytes | mmap.mmap = b""
        self._code_start, self._code_size = 0, -1
        self._thread = threading.Thread(target=self._main, name=f"vcpu{self.vp_index}", daemon=True)

    # -- control, from any thread ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True once it has ended."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, detail: str = "stopped by the VMM", reason: StopReason = StopReason.STOPPED) -> None:
        """End the thread soon with ``reason``: wake it if it waits, kick it out of the guest if it runs."""
        with self._stop_lock:
            if self._stop_taken:
                if reason is StopReason.ERROR:
                    log.error("VP %d had already stopped: %s", self.vp_index, detail)
            elif not self.stopping or (reason is StopReason.ERROR and self.stop_request[0] is not StopReason.ERROR):
                # A guest state gone wrong outranks a plain stop asked for at about the same time
                # (the exit device written in the same batch as a posted OUT whose completion disagrees).
                self.stop_request = (reason, detail)
                self.stopping = True
        self.inbox.put(WAKE)
        self.vcpu.kick()

    def interrupt_raised(self) -> None:
        """The interrupt line went high (loop thread): get the vCPU to look at it."""
        if self.halted:
            self.inbox.put(WAKE)
        elif self.in_guest:
            self.vcpu.kick()

    # -- the thread -----------------------------------------------------------------------------

    def _main(self) -> None:
        self.vcpu.bind_thread()
        try:
            self.result = self._loop()
        except Exception as error:  # a bug here must still end the VP with a report, not kill the loop
            log.exception("VP %d failed", self.vp_index)
            self.result = self._stop(StopReason.ERROR, f"{type(error).__name__}: {error}")
        finally:
            with self._stop_lock:
                self._stop_taken = True  # whatever ended the thread, a later stop request changes nothing
            self.in_guest = False
            self.vcpu.unbind_thread()
            self.host.runner_finished(self)

    def _rip(self) -> int:
        rip: int = _U64.unpack_from(self.vcpu.run_map, REGS_OFFSET + 8 * 16)[0]
        return rip

    def _stop_requested(self) -> VcpuStop:
        with self._stop_lock:
            self._stop_taken = True
            return self._stop(*self.stop_request)

    def _stop(self, reason: StopReason, detail: str) -> VcpuStop:
        return VcpuStop(self.vp_index, reason, detail, self._rip())

    def _loop(self) -> VcpuStop:
        vcpu = self.vcpu
        fd, m = vcpu.fd, vcpu.run_map
        _U64.pack_into(m, _VALID_REGS_OFFSET, SYNC_ALL)
        ioctl, header, io_struct, regs_unpack = (
            fcntl.ioctl,
            _HEADER.unpack_from,
            _IO.unpack_from,
            REGS_STRUCT.unpack_from,
        )
        read_upto, read_before, new_capture = self.reader.read_upto, self.reader.read_before, tuple.__new__
        advanced, posting = self.out_rip_advanced, self.posting
        put = self.host.put
        while True:
            if self.stopping:
                return self._stop_requested()
            self.in_guest = True
            if self.interrupt_level:
                self._offer_interrupt()
            try:
                ioctl(fd, _RUN, 0)
            except InterruptedError:
                m[1] = 0  # immediate_exit: consumed
                continue
            finally:
                self.in_guest = False
            self.exits += 1
            reason, ready, if_flag, _flags, cr8 = header(m)
            if reason == _EXIT_IO:
                direction, size, port, count, data_offset = io_struct(m, 32)
                regs = regs_unpack(m, REGS_OFFSET)
                if m[SREGS_OFFSET:_EVENTS_END] != self._state_bytes:
                    self._new_context()
                linear = (self._cs_base + regs[16]) & self._linear_mask
                is_write = direction == _OUT
                if not is_write:
                    code_at, code_before, data, plain_out = read_upto(linear, 16), b"", b"", False
                else:
                    # The 15 bytes before RIP, straight from the slot when the guest does not page (the usual case).
                    offset = linear - self._code_start
                    if 15 <= offset <= self._code_size:
                        code_before = self._code_buffer[offset - 15 : offset]
                    else:
                        code_before = read_before(linear, 15)
                        self._code_slot(linear)
                    # A non-string OUT ends in EE/EF (port in DX), or in E6/E7 and its imm8 port.
                    plain_out = (
                        count == 1
                        and not regs[17] & _RF
                        and bool(code_before)
                        and (code_before[-1] in _OUT_DX or (code_before[-1] == port and code_before[-2:-1] in _OUT_IMM))
                    )
                    code_at = b"" if plain_out and advanced else read_upto(linear, 16)
                    data = m[data_offset : data_offset + size * count]
                shadow, pending = self._events
                capture = new_capture(IoCapture, (is_write, size, port, count, regs, self.context, shadow,
                                                  pending, cr8, data, code_at, code_before, plain_out,
                                                  self.generation))  # fmt: skip
                if posting and plain_out:
                    self.posted += 1
                    put((self, capture), urgent=False)
                    if self.posted - self.completed >= MAX_POSTED:
                        self._fence()
                    continue
                put((self, capture))
                action = self._wait_action()
                if action is None:
                    return self._stop_requested()
                if action.data is not None:
                    m[data_offset : data_offset + len(action.data)] = action.data
                if action.registers is not None:
                    self._finish_pending()
                    self._set_registers(action.registers)
                if action.refused is not None:
                    return self._stop(StopReason.REFUSED, action.refused)
                continue
            stop = self._other_exit(reason, bool(if_flag), bool(ready))
            if stop is not None:
                return stop

    def _other_exit(self, reason: int, if_flag: bool, ready: bool) -> VcpuStop | None:
        m = self.vcpu.run_map
        run = self.vcpu.kvm_run
        if reason == _EXIT_MMIO:
            _address, _data, length, is_write = _MMIO.unpack_from(m, 32)
            if is_write:
                self.mmio_writes += 1  # nothing is mapped there (or it is ROM): the write goes nowhere
            else:
                self.mmio_reads += 1
                m[40 : 40 + min(length, 8)] = b"\xff" * min(length, 8)  # unclaimed reads float high
            return None
        if reason == _EXIT_HLT:
            return self._halt(if_flag)
        if reason == abi.KVM_EXIT_IRQ_WINDOW_OPEN:
            run.request_interrupt_window = 0
            self.window_requested = False
            return None
        if reason == abi.KVM_EXIT_INTR:
            return None
        self._fence()
        stop_reason, detail = terminal_exit(run)
        return self._stop(stop_reason, detail)

    def _new_context(self) -> None:
        # The segments, mode or event state changed since the last exit: parse them once, and number the change.
        raw = self.vcpu.run_map[SREGS_OFFSET:_EVENTS_END]
        self._state_bytes = raw
        context = self.context = parse_context(raw[:CONTEXT_SIZE])
        self._events = parse_events(raw[EVENTS_OFFSET - SREGS_OFFSET :])
        self.generation += 1
        self.reader.paging = context.paging
        bits = context.code_bits
        self._cs_base = context.cs.base if bits != 64 else 0
        self._linear_mask = (1 << 64) - 1 if bits == 64 else 0xFFFF_FFFF
        self._code_start, self._code_size, self._code_buffer = 0, -1, b""

    def _code_slot(self, linear: int) -> None:
        # Remember the memory slot holding ``linear`` while the guest does not page: code is read from it directly.
        if self.reader.paging:
            return
        for slot in self.regions:
            if slot.contains(linear):
                self._code_start, self._code_size, self._code_buffer = slot.guest_phys_addr, slot.size, slot.mem
                return

    # -- waiting --------------------------------------------------------------------------------

    def _wait_action(self) -> Action | None:
        # The completion of the exit just sent; None if the VP is being stopped instead.
        while True:
            message = self.inbox.get()
            if isinstance(message, Action):
                return message
            if self.stopping:
                return None

    def _fence(self) -> None:
        """Wait until every posted write of this VP has its completion (or the VP is stopping)."""
        if self.posted == self.completed:
            return
        self.fencing = True
        self.host.wake_loop()
        try:
            while self.posted != self.completed and not self.stopping:
                self.inbox.get()
        finally:
            self.fencing = False

    def _halt(self, if_flag: bool) -> VcpuStop | None:
        self._fence()
        if self.stopping:
            return None
        if not if_flag or not self.takes_interrupts:
            why = "interrupts disabled" if not if_flag else "no interrupt controller attached to this vCPU"
            return self._stop(StopReason.HALTED, f"HLT with {why}: nothing can wake it")
        self.halted = True
        try:
            while not self.interrupt_level and not self.stopping:
                self.inbox.get()
        finally:
            self.halted = False
        return None

    def _offer_interrupt(self) -> None:
        # The interrupt line is high: inject now if the guest can take it, else ask KVM to say when it can.
        run = self.vcpu.kvm_run
        if not (run.ready_for_interrupt_injection and run.if_flag):
            run.request_interrupt_window = 1
            self.window_requested = True
            return
        self._fence()
        self.host.put((self, ACKNOWLEDGE))  # the interrupt acknowledge cycle runs on the loop thread
        while True:
            message = self.inbox.get()
            if isinstance(message, int) or message is None:
                break
            if self.stopping:
                return
        run.request_interrupt_window = 0
        self.window_requested = False
        if message is not None:
            self.vcpu.inject_interrupt(message)

    # -- applying completions -------------------------------------------------------------------

    def _finish_pending(self) -> None:
        """Let KVM finish the I/O instruction without running guest code (``immediate_exit``)."""
        fd, m = self.vcpu.fd, self.vcpu.run_map
        m[1] = 1
        try:
            for _ in range(64):
                try:
                    fcntl.ioctl(fd, _RUN, 0)
                except InterruptedError:
                    return
                # Finishing an INS may store to unbacked memory: that is an MMIO exit, dropped.
                if _HEADER.unpack_from(m)[0] == _EXIT_MMIO:
                    self._other_exit(_EXIT_MMIO, False, False)
                    continue
                raise RuntimeError(f"finishing an I/O instruction gave exit {_HEADER.unpack_from(m)[0]}")
        finally:
            m[1] = 0

    def _set_registers(self, values: tuple[int, int, int, int, int]) -> None:
        """Set RIP, RAX, RCX, RSI, RDI through the sync-register area (loaded at the next KVM_RUN)."""
        m = self.vcpu.run_map
        for offset, value in zip(_REG_OFFSETS, values, strict=True):
            _U64.pack_into(m, offset, value)
        dirty = _U64.unpack_from(m, _DIRTY_REGS_OFFSET)[0]
        _U64.pack_into(m, _DIRTY_REGS_OFFSET, dirty | abi.KVM_SYNC_X86_REGS)


def terminal_exit(run: abi.KvmRun) -> tuple[StopReason, str]:
    """Why an exit that ends the vCPU does so, in words, from ``kvm_run`` as KVM left it."""
    reason = run.exit_reason
    if reason == abi.KVM_EXIT_SHUTDOWN:
        return StopReason.SHUTDOWN, "KVM_EXIT_SHUTDOWN: triple fault (or an unrecoverable fault)"
    if reason == abi.KVM_EXIT_FAIL_ENTRY:
        fail = run.fail_entry
        return StopReason.FAIL_ENTRY, (
            f"KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {fail.hardware_entry_failure_reason:#x} "
            f"on CPU {fail.cpu}"
        )
    if reason == abi.KVM_EXIT_INTERNAL_ERROR:
        internal = run.internal
        data = ", ".join(f"{d:#x}" for d in internal.data[: min(internal.ndata, 16)])
        return StopReason.INTERNAL_ERROR, f"KVM_EXIT_INTERNAL_ERROR: suberror {internal.suberror} [{data}]"
    if reason == abi.KVM_EXIT_SYSTEM_EVENT:
        return StopReason.SYSTEM_EVENT, f"KVM_EXIT_SYSTEM_EVENT: type {run.system_event.type}"
    return StopReason.ERROR, f"exit reason {reason}, which this VMM does not handle"
