"""One vCPU's thread: ``KVM_RUN`` in a loop, each port I/O exit answered here or by the event loop.

The thread copies the exit's state out of ``kvm_run``, waits for the
completion when the guest must not run on without it, applies it, and
handles the exits that are not port I/O. Where the dispatcher answers
inline (:attr:`VcpuHost.answer <transports.kvm.runner.VcpuHost.answer>`, set once the dispatcher has called
:meth:`~dispatcher.Transport.start_inline`), the thread also builds the
intercept frame and hands it to the dispatcher itself: a synchronous
handler runs on this thread, holding the VM's device lock, and the
completion is applied at once; only async handlers involve the event loop,
which sends their completions back later. Otherwise every intercept goes
to the event loop in the :class:`VcpuHost` that drives the runners
(:class:`~transports.kvm.transport.KvmTransport`), which builds it, runs
the dispatcher and sends the completion back.

Posted writes: a non-string ``OUT`` is complete as far as the guest can see
(KVM has advanced RIP, RAX is unchanged), so the thread re-enters the guest
at once and dispatches the intercept later, like a posted write on a PCI
bus. Inline, it keeps a batch of them and hands it to the dispatcher
itself, in one call with its next waited intercept; a batch that gets full
(``POSTED_BATCH``) or old (``POSTED_LATENCY``, or the loop kicks a guest
that makes no exits) goes to the event loop instead, whose thread builds
and dispatches it while this one runs the guest. Otherwise the loop takes
them in batches. The intercepts of one VP stay in order, so a later IN sees every
earlier OUT's effect; before it acknowledges an interrupt, halts or stops,
the thread waits until every posted write of its VP is complete (a fence).
The completion is still checked when it arrives: one that asks for a state
other than the one the guest already has stops the VP.
"""

from __future__ import annotations

import enum
import fcntl
import logging
import mmap
import queue
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from dispatcher import BufferMemory, DecodedAnswer, InlineAnswer
from dispatcher.wire import (
    COMPLETION,
    COMPLETION_PAYLOAD,
    COMPLETION_SIZE,
    COMPLETION_STRUCT,
    PROTOCOL_VERSION,
    Registers,
)

from . import abi
from .intercept import (
    SIMPLE_FRAME,
    Action,
    FrameBuilder,
    IoCapture,
    IoDecodeError,
    PendingIo,
    PostedOut,
    SimpleIo,
)
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

__all__ = ["MAX_POSTED", "POSTED_BATCH", "POSTED_LATENCY", "StopReason", "VcpuHost", "VcpuRunner", "VcpuStop",
           "terminal_exit"]  # fmt: skip

log = logging.getLogger("intercept_dispatch.kvm")

_HEADER = struct.Struct("<8xIBBHQ")  # exit_reason, ready_for_interrupt_injection, if_flag, flags, cr8
_IO = struct.Struct("<BBHIQ")  # kvm_run.io at offset 32: direction, size, port, count, data_offset
_HEADER_IO = struct.Struct(_HEADER.format + "8x" + _IO.format[1:])  # both in one call (the io fields: I/O exits only)
_MMIO = struct.Struct("<Q8sIB")  # kvm_run.mmio at offset 32: phys_addr, data, len, is_write
_U64 = struct.Struct("<Q")
_VALID_REGS_OFFSET, _DIRTY_REGS_OFFSET = 288, 296
_REG_OFFSETS = tuple(REGS_OFFSET + 8 * i for i in (16, 0, 2, 4, 5))  # RIP, RAX, RCX, RSI, RDI
_RF = 1 << 16
_OUT = abi.KVM_EXIT_IO_OUT
_OUT_DX, _OUT_IMM = (0xEE, 0xEF), (b"\xe6", b"\xe7")
_RUN, _EXIT_IO, _EXIT_MMIO, _EXIT_HLT = abi.KVM_RUN, abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO, abi.KVM_EXIT_HLT
_RIP_ONLY, _RIP_RAX = int(Registers.RIP), int(Registers.RIP | Registers.RAX)
_VALUE_MASK = (0, 0xFF, 0xFFFF, 0, 0xFFFF_FFFF)
_KEEP_MASK = tuple(~mask & (1 << 64) - 1 for mask in _VALUE_MASK)  # RAX bits an 8- or 16-bit IN keeps
# A completion: type, PayloadSize and three bytes, partition, VpIndex, Version, Status; then Registers, RIP, RAX.
_USUAL_HEAD = struct.Struct("<I4BQIBB")
assert COMPLETION_STRUCT.format.startswith(_USUAL_HEAD.format + "HQQ")
# A completion as its head's bytes, Registers, RIP and RAX (the rest skipped): only a frame of that size unpacks.
_USUAL = struct.Struct(f"<{_USUAL_HEAD.size}sHQQ{COMPLETION_SIZE - _USUAL_HEAD.size - 18}x")
_STATE_SLICE = slice(SREGS_OFFSET, EVENTS_OFFSET + 16)  # kvm_sregs and kvm_vcpu_events
# By access size: stores an IN's value into the I/O data page.
_STORE_VALUE = {size: struct.Struct(f"<{code}").pack_into for size, code in ((1, "B"), (2, "H"), (4, "I"))}
MAX_POSTED: Final = 2048  # posted writes in flight before the thread waits (back-pressure): two batches
"""Posted writes a vCPU may have in flight before it waits for their completions (back-pressure)."""
# Posted writes are dispatched in batches: every hand-off to the loop makes the two threads trade the GIL (on
# this host out_loop ran at 0.57x the bare loop with batches of 256, 0.72x with 512 and 0.78x with 1024), and
# one call of the dispatcher costs about twice as much per frame for one frame as for a batch. The loop's
# thread runs a batch while the vCPU's runs the guest (KVM_RUN releases the GIL): dispatching every posted
# write on the vCPU thread instead ran out_loop at 0.65x. A posted
# write waits at most POSTED_LATENCY for its device to see it, and never longer than the guest can tell: a
# later IN is handled after it, and an interrupt acknowledge, HLT or stop waits for all of the VP's posted
# writes (a fence).
POSTED_BATCH: Final = 1024
"""Posted writes dispatched together (at most)."""
POSTED_LATENCY: Final = 0.01
"""Seconds a posted write may wait for its batch before it is dispatched."""


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
    POSTED = "posted"  # to the loop: this vCPU keeps a batch of posted writes (kick it if the batch gets old)


class _Abandoned(Exception):
    """Raised on a vCPU thread that returns from the dispatcher after its transport gave up on it."""


WAKE: Final = _Signal.WAKE
ACKNOWLEDGE: Final = _Signal.ACKNOWLEDGE
FINISHED: Final = _Signal.FINISHED
POSTED: Final = _Signal.POSTED


class VcpuHost(Protocol):
    """What a :class:`~transports.kvm.runner.VcpuRunner` needs from the loop side that drives it (a ``KvmTransport``).

    The runner's thread calls these; each must be safe from any thread.
    :attr:`answer` and :attr:`answer_decoded` are read once, when the thread starts.
    """

    @property
    def answer(self) -> InlineAnswer | None:
        """The dispatcher's inline entry (frames in, completions ready now out), or None: intercepts go to the loop."""

    @property
    def answer_decoded(self) -> DecodedAnswer | None:
        """The dispatcher's entry for decoded intercepts, tried before a frame is built; None: frames only."""

    @property
    def acknowledge(self) -> Callable[[VcpuRunner], int | None] | None:
        """Runs the interrupt acknowledge cycle on the calling vCPU thread (the vector, or None); None: on the loop."""

    def deliver(self, frame: bytes, here: VcpuRunner) -> Action | None:
        """Apply a completion frame to the runner it names; return the action if it is for ``here``'s waited intercept.

        Anything else (a posted write's completion, or one for another
        runner) is dealt with as a completion from the loop is.
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
        # Intercepts whose completions have not been applied, in order. Appended by whichever thread builds
        # the intercept (the loop, or this thread when answering inline); popped where completions arrive.
        self.in_flight: deque[PendingIo | SimpleIo | PostedOut] = deque()
        self.builder: FrameBuilder | None = None  # set by the host: this VP's intercepts, built on this thread inline
        # Posted writes: ``posted`` is counted by this thread, ``completed`` where their completions arrive.
        self.posted = 0
        self.completed = 0
        self.intercepts = 0  # intercepts built for this VP
        self.slow_completions = 0  # completions applied by setting registers (see plan_completion)
        self.via_loop = 0  # completions that came from the event loop (sent with send_batch)
        self.batch: list[IoCapture] = []  # posted writes not yet handed to the dispatcher or the loop (inline only)
        self.batch_since = 0.0  # time.perf_counter() when the oldest of them was made
        self.loop_intercepts = 0  # intercepts the loop built (from captures this thread handed over)
        self.fencing = False
        self.abandoned = False
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

    def abandon(self) -> None:
        """Give up on a thread stuck in device code: whatever it returns with is dropped, and it ends quietly."""
        self.abandoned = True

    def abandoned_stop(self) -> VcpuStop:
        """The report for an abandoned thread (from the thread that gives up on it)."""
        return self._stop(StopReason.ERROR, "abandoned: its thread did not return from a device handler")

    def interrupt_raised(self) -> None:
        """The interrupt line went high (any thread): get the vCPU to look at it."""
        if self.halted:
            self.inbox.put(WAKE)
        elif self.in_guest:
            self.vcpu.kick()

    # -- the thread -----------------------------------------------------------------------------

    def _main(self) -> None:
        self.vcpu.bind_thread()
        try:
            self.result = self._loop()
        except _Abandoned:
            pass  # reported by whoever gave up on this thread; the VM may be gone
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
        header_io, regs_unpack = _HEADER_IO.unpack_from, REGS_STRUCT.unpack_from
        read_upto, read_before, new_capture = self.reader.read_upto, self.reader.read_before, tuple.__new__
        advanced, posting = self.out_rip_advanced, self.posting
        put = self.host.put
        answer = self.host.answer
        answer_decoded = self.host.answer_decoded
        inline = answer is not None
        builder = self.builder
        assert builder is not None
        templates, in_flight = builder.templates, self.in_flight
        partition, vp_index = builder.partition, self.vp_index
        # The usual completion for this VP starts with these bytes: type, size, zero flags, partition, VpIndex,
        # this version, COMPLETED. Registers, RIP and RAX follow.
        usual_head = _USUAL_HEAD.pack(COMPLETION, COMPLETION_PAYLOAD, 0, 0, 0, partition, vp_index, PROTOCOL_VERSION, 0)
        usual_unpack, pack_frame, store_value = _USUAL.unpack, SIMPLE_FRAME.pack, _STORE_VALUE
        value_mask, keep_mask = _VALUE_MASK, _KEEP_MASK
        ioctl, state_slice = fcntl.ioctl, _STATE_SLICE
        # What the last context change (or code slot) set, as locals: reloaded whenever those change.
        state_bytes, cs_base, linear_mask, (shadow, pending), generation = self._context_locals()
        code_start, code_size, code_buffer = self._code_start, self._code_size, self._code_buffer
        while True:
            if self.stopping:
                if self.batch:
                    self._flush()  # the guest has done these OUTs: their devices see them before the VP ends
                return self._stop_requested()
            self.in_guest = True
            if self.interrupt_level:
                self._offer_interrupt()
            try:
                # No third argument: given an int, fcntl.ioctl first tries it as a buffer twice, raising and
                # clearing two TypeErrors, which costs about 2 us here (a seventh of the exit).
                ioctl(fd, _RUN)
            except InterruptedError:
                m[1] = 0  # immediate_exit: consumed
                if self.batch:
                    self._hand_over()  # kicked because the batch got old while the guest ran without exits
                continue
            finally:
                self.in_guest = False
            self.exits += 1
            reason, ready, if_flag, _flags, cr8, direction, size, port, count, data_offset = header_io(m)
            if reason == _EXIT_IO:
                regs = regs_unpack(m, REGS_OFFSET)
                if m[state_slice] != state_bytes:
                    self._new_context()
                    state_bytes, cs_base, linear_mask, (shadow, pending), generation = self._context_locals()
                    code_start, code_size, code_buffer = self._code_start, self._code_size, self._code_buffer
                linear = (cs_base + regs[16]) & linear_mask
                is_write = direction == _OUT
                if not is_write:
                    offset = linear - code_start
                    if 0 <= offset <= code_size - 16:
                        code_at = code_buffer[offset : offset + 16]
                    else:
                        code_at = read_upto(linear, 16)
                        self._code_slot(linear)
                        code_start, code_size, code_buffer = self._code_start, self._code_size, self._code_buffer
                    code_before, data, plain_out = b"", b"", False
                else:
                    # The 15 bytes before RIP, straight from the slot when the guest does not page (the usual case).
                    offset = linear - code_start
                    if 15 <= offset <= code_size:
                        code_before = code_buffer[offset - 15 : offset]
                    else:
                        code_before = read_before(linear, 15)
                        self._code_slot(linear)
                        code_start, code_size, code_buffer = self._code_start, self._code_size, self._code_buffer
                    # A non-string OUT ends in EE/EF (port in DX), or in E6/E7 and its imm8 port.
                    plain_out = (
                        count == 1
                        and not regs[17] & _RF
                        and bool(code_before)
                        and (code_before[-1] in _OUT_DX or (code_before[-1] == port and code_before[-2:-1] in _OUT_IMM))
                    )
                    code_at = b"" if plain_out and advanced else read_upto(linear, 16)
                    data = m[data_offset : data_offset + size * count]
                # The hot path, written out: an IN or OUT the vCPU waits for, with nothing before it in flight or
                # still to be dispatched (no posted write outstanding), at a place seen before (FrameBuilder.simple's
                # template), answered here with the usual completion (usual_action). Anything else takes the
                # general path below.
                if inline and not in_flight and self.posted == self.completed and not (posting and plain_out):
                    template = templates.get((generation, regs[16], port, size, is_write, cr8, shadow, pending, code_at,
                                              code_before))  # fmt: skip
                    if template is not None:
                        head, middle, tail, at, next_rip = template
                        rax = regs[0]
                        self.intercepts += 1
                        # First without a frame: the dispatcher answers the common case from these fields.
                        decoded = (
                            None
                            if answer_decoded is None
                            else answer_decoded(partition, vp_index, port, size, is_write, rax, next_rip)
                        )
                        if isinstance(decoded, int):
                            if not is_write:
                                store_value[size](m, data_offset, decoded)
                            continue
                        record = new_capture(SimpleIo, (is_write, size, port, 1, at, next_rip, regs))
                        in_flight.append(record)
                        if decoded is not None:
                            completions = [decoded]
                        else:
                            completions = answer((pack_frame(head, regs[17], middle, rax, tail),))  # type: ignore[misc]
                        if self.abandoned:
                            raise _Abandoned
                        # One completion of the usual size (else ValueError or struct.error) for this record, the
                        # only one in flight: only this thread adds to in_flight while it waits for none.
                        try:
                            [completion] = completions
                            got_head, named, rip, new_rax = usual_unpack(completion)
                        except (ValueError, struct.error):
                            got_head = b""
                        if got_head == usual_head and rip == next_rip:
                            if is_write:
                                usual = named == _RIP_ONLY or (named == _RIP_RAX and new_rax == rax)
                            else:
                                value = new_rax & value_mask[size]
                                usual = named == _RIP_RAX and new_rax == (
                                    value if size == 4 else rax & keep_mask[size] | value
                                )
                                if usual:
                                    store_value[size](m, data_offset, value)
                            if usual:
                                in_flight.popleft()
                                continue
                        action = self._take_completions(completions, record)
                        if action is None:
                            action = self._wait_action()
                        if action is None:
                            continue  # the VP is stopping: at the top of the loop
                        self._apply(action, data_offset)
                        if action.refused is not None:
                            return self._stop(StopReason.REFUSED, action.refused)
                        continue
                capture = new_capture(IoCapture, (is_write, size, port, count, regs, self.context, shadow,
                                                  pending, cr8, data, code_at, code_before, plain_out,
                                                  generation))  # fmt: skip
                if posting and plain_out:
                    self.posted += 1
                    if inline:
                        self._post(capture)
                    else:
                        put((self, capture), urgent=False)
                        if self.posted - self.completed >= MAX_POSTED:
                            self._fence()
                    continue
                if inline:
                    action = self._exchange(capture)
                else:
                    put((self, capture))
                    action = self._wait_action()
                if action is None:
                    continue  # the VP is stopping: at the top of the loop
                self._apply(action, data_offset)
                if action.refused is not None:
                    return self._stop(StopReason.REFUSED, action.refused)
                continue
            stop = self._other_exit(reason, bool(if_flag), bool(ready))
            if stop is not None:
                return stop

    # -- answering inline (this thread runs the synchronous handlers) --------------------------

    def _post(self, capture: IoCapture) -> None:
        # A posted OUT joins this VP's batch, dispatched later (see the module docstring). A full or old batch
        # goes to the event loop, whose thread builds the intercepts and runs the handlers while this one runs
        # the guest (the two share one GIL, which KVM_RUN releases); before an intercept the vCPU waits for,
        # the batch is dispatched here, in the same call.
        batch = self.batch
        batch.append(capture)
        if len(batch) == 1:
            self.batch_since = time.perf_counter()
            self.host.put((self, POSTED), urgent=False)  # so the loop can kick this vCPU if the guest goes quiet
        elif len(batch) >= POSTED_BATCH or time.perf_counter() - self.batch_since >= POSTED_LATENCY:
            self._hand_over()
            if self.posted - self.completed >= MAX_POSTED:
                self._fence()

    def _hand_over(self) -> None:
        """Have the event loop dispatch the batch of posted writes."""
        captures, self.batch = self.batch, []
        self.host.put((self, captures))

    def _posted_frames(self) -> list[bytes]:
        # The batch as intercepts this thread dispatches, their records in flight.
        builder = self.builder
        assert builder is not None
        frames = []
        for capture in self.batch:
            try:
                built = builder.simple(capture)
            except IoDecodeError as error:
                self.completed += 1  # nothing will complete it
                self.stop(f"VP {self.vp_index}: {error}", StopReason.ERROR)
                continue
            assert built is not None  # a plain OUT decodes as a non-string OUT
            frame, template = built
            self.in_flight.append(PostedOut(template.next_rip, capture.regs[0], capture.port, template.at))
            frames.append(frame)
        self.intercepts += len(frames)
        self.batch = []
        return frames

    def _flush(self) -> None:
        """Dispatch the batch of posted writes on this thread (inline), or by the loop if it still has some."""
        self._wait_handed_over()
        if self.completed < self.posted - len(self.batch):
            self._hand_over()  # stopping: the loop dispatches them after those it has
            return
        frames = self._posted_frames()
        if frames:
            self._answer(frames, self.in_flight[-len(frames)])

    def _wait_handed_over(self) -> None:
        # Intercepts are dispatched in order, and the records in flight are kept in that order: before this
        # thread dispatches anything itself, the posted writes it gave the loop must be complete.
        target = self.posted - len(self.batch)
        if self.completed >= target:
            return
        self.fencing = True
        self.host.wake_loop()
        try:
            while self.completed < target and not self.stopping:
                self.inbox.get()
        finally:
            self.fencing = False

    def _exchange(self, capture: IoCapture) -> Action | None:
        # An intercept the vCPU waits for: dispatched here, after the posted writes before it, in one call.
        builder = self.builder
        assert builder is not None
        self._wait_handed_over()
        if self.stopping:
            return None
        frames = self._posted_frames() if self.batch else []  # handed-over ones are complete (above)
        record: SimpleIo | PendingIo
        try:
            simple = builder.simple_io(capture)
            if simple is not None:
                frame, record = simple
            else:
                record = builder.build(capture)
                frame = record.frame
        except IoDecodeError as error:
            if frames:
                self._answer(frames, self.in_flight[-len(frames)])
            self.stop(f"VP {self.vp_index}: {error}", StopReason.ERROR)
            return None
        self.intercepts += 1
        in_flight = self.in_flight
        in_flight.append(record)
        frames.append(frame)
        action = self._answer(frames, in_flight[-len(frames)])
        return action if action is not None else self._wait_action()

    def _apply(self, action: Action, data_offset: int) -> None:
        # A completion's data and registers, into kvm_run (the guest sees them at the next KVM_RUN).
        if action.data is not None:
            self.vcpu.run_map[data_offset : data_offset + len(action.data)] = action.data
        if action.registers is not None:
            self._finish_pending()
            self._set_registers(action.registers)

    def _answer(self, frames: list[bytes], first: PendingIo | SimpleIo | PostedOut) -> Action | None:
        # The dispatcher answers what it can on this thread; completions of async handlers come later from the
        # loop. ``first`` is the in-flight record of frames[0]. Returns the action for the waited intercept among
        # ``frames`` if its completion came now.
        answer = self.host.answer
        assert answer is not None
        completions = answer(frames)
        if self.abandoned:
            raise _Abandoned
        return self._take_completions(completions, first)

    def _take_completions(self, completions: list[bytes], first: PendingIo | SimpleIo | PostedOut) -> Action | None:
        # Apply what the dispatcher returned for this VP's intercepts from the one ``first`` records on.
        if not completions:
            return None
        if self.in_flight[0] is not first and not self._wait_first(first):
            return None
        action = None
        deliver = self.host.deliver
        for frame in completions:
            got = deliver(frame, self)
            if got is not None:
                action = got
        return action

    def _wait_first(self, first: PendingIo | SimpleIo | PostedOut) -> bool:
        # Completions of this VP's earlier intercepts (posted writes an async handler took) are on their way
        # from the loop: the dispatcher made them before these, so they are applied first.
        self.fencing = True
        try:
            while self.in_flight[0] is not first:
                if self.stopping:
                    log.warning("VP %d: completions dropped: the VP stopped before earlier ones arrived", self.vp_index)
                    return False
                self.inbox.get()
        finally:
            self.fencing = False
        return True

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

    def _context_locals(self) -> tuple[bytes, int, int, tuple[bool, bool], int]:
        return self._state_bytes, self._cs_base, self._linear_mask, self._events, self.generation

    def _new_context(self) -> None:
        # The segments, mode or event state changed since the last exit: parse them once, and number the change.
        raw = self.vcpu.run_map[_STATE_SLICE]
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
        if self.batch:
            self._flush()
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
        acknowledge = self.host.acknowledge
        if acknowledge is not None:
            message: Action | _Signal | int | None = acknowledge(self)
        else:
            self.host.put((self, ACKNOWLEDGE))  # the interrupt acknowledge cycle runs on the loop thread
            while True:
                message = self.inbox.get()
                if isinstance(message, int) or message is None:
                    break
                if self.stopping:
                    return
        run.request_interrupt_window = 0
        self.window_requested = False
        if isinstance(message, int):
            self.vcpu.inject_interrupt(message)

    # -- applying completions -------------------------------------------------------------------

    def _finish_pending(self) -> None:
        """Let KVM finish the I/O instruction without running guest code (``immediate_exit``)."""
        fd, m = self.vcpu.fd, self.vcpu.run_map
        m[1] = 1
        try:
            for _ in range(64):
                try:
                    fcntl.ioctl(fd, _RUN)
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
