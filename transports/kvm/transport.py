"""A KVM VM's vCPUs as a dispatcher transport: port I/O exits in, completions out.

::

    vm = Vm(); vm.add_ram(0, 2 << 20); vcpu = vm.create_vcpu(); ...
    transport = KvmTransport(vm, [vcpu])
    dispatcher = Dispatcher(router)                # string I/O uses transport.guest: memory, translation, segments
    await dispatcher.serve(transport)              # returns when every vCPU has stopped
    print(transport.stops)                         # why each one stopped

Each vCPU runs in its own thread (:class:`~transports.kvm.runner.VcpuRunner`).
The transport :attr:`~dispatcher.Transport.answers_inline`: served by a
:class:`~dispatcher.Dispatcher`, each vCPU thread builds its intercepts,
hands them to the dispatcher itself and applies the completions, so a
synchronous handler runs on the thread of the vCPU whose I/O it serves
(holding the dispatcher's :attr:`~dispatcher.Dispatcher.lock`) and the event
loop is not involved; async handlers run on the loop, which sends their
completions back with :meth:`send_batch`. Read through
:meth:`receive_batch` instead (a relay to another process), the loop
thread builds the intercepts and plans the completions.

Interrupts: give an ``interrupts`` controller (``pending_vector()`` and
``acknowledge()``, as :class:`examples.pic.PicPair` has) and wire its
output to the transport, which is an :class:`~dispatcher.IrqReceiver` whose
line number is the VP index: ``IrqLine(transport, 0, "INTR")``. When the line
is high, the vCPU injects the acknowledged vector as soon as the guest can
take it (``KVM_INTERRUPT``, or ``request_interrupt_window`` first), and a
``HLT`` waits for it. The acknowledge cycle calls device code: it runs on
the vCPU thread holding ``lock`` (give the dispatcher's
:attr:`~dispatcher.Dispatcher.lock`) when the transport answers inline, on
the loop thread otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import anyio

from dispatcher import (
    DecodedAnswer,
    FrameError,
    Guest,
    InlineAnswer,
    InterruptController,
    Registers,
    Segment,
    SegmentRegister,
    Transport,
    TransportError,
)
from dispatcher.wire import frame_ids

from .handoff import HandoffMethod, ThreadToLoop
from .hostinfo import out_advances_rip
from .intercept import (
    REFUSED,
    Action,
    FrameBuilder,
    IoCapture,
    IoDecodeError,
    PendingIo,
    PostedOut,
    SimpleIo,
    plan_completion,
    posted_confirmed,
    read_completion,
    usual_action,
)
from .memory import vm_memory
from .runner import (
    ACKNOWLEDGE,
    FINISHED,
    POSTED_BATCH,
    POSTED_LATENCY,
    WAKE,
    StopReason,
    VcpuRunner,
    VcpuStop,
)
from .vm import KVM_PATH, KvmError, Vcpu, Vm

__all__ = ["InterruptController", "KvmTransport", "RemoteInterruptController"]

log = logging.getLogger("intercept_dispatch.kvm")

_WINDOW_KICK = 0.001  # seconds between kicks of a vCPU whose interrupt window is not reported
# How long aclose() waits, once every vCPU was told to stop, for their threads to end before abandoning those
# still running (stuck in a device handler that does not return).
_ABANDON_AFTER = 2.0
_RIP_BIT, _RAX_BIT = int(Registers.RIP), int(Registers.RAX)
_NOT_OUT = int(Registers.RCX | Registers.RSI | Registers.RDI)


@runtime_checkable
class RemoteInterruptController(Protocol):
    """An interrupt controller that answers the acknowledge cycle asynchronously (one in another process)."""

    async def acknowledge_pending(self) -> int | None:
        """Run the acknowledge cycle if an interrupt is pending; its vector, or None."""


class KvmTransport(Transport):
    """The vCPUs of ``vm`` (all of them by default) as one dispatcher connection.

    ``partition`` goes into every intercept's SourcePartition. With
    ``posted_writes`` (the default) a non-string OUT does not hold up its
    vCPU (see :mod:`transports.kvm.runner`). ``handoff`` picks how vCPU
    threads wake the loop (:mod:`transports.kvm.handoff`). ``lock`` is the
    VM's device lock (the serving dispatcher's
    :attr:`~dispatcher.Dispatcher.lock`), held around the interrupt
    acknowledge cycle when it runs on a vCPU thread; it may also be set
    later, before serving. ``stops`` lists, once each thread has ended, why.

    :attr:`guest` carries the VM's memory, a translation hook and the vCPUs'
    segments, so a :class:`~dispatcher.Dispatcher` serving this transport
    does string I/O on the guest's own memory. :meth:`stop_reading` (the
    dispatcher's graceful stop) stops every vCPU; the intercepts that had
    arrived are still answered, then the stream ends.
    """

    stops_reading: ClassVar[bool] = True
    answers_inline: ClassVar[bool] = True
    answers_decoded: ClassVar[bool] = True

    def __init__(
        self,
        vm: Vm,
        vcpus: Sequence[Vcpu] | None = None,
        *,
        partition: int = 0,
        posted_writes: bool = True,
        interrupts: InterruptController | RemoteInterruptController | None = None,
        handoff: HandoffMethod = "auto",
        kvm_path: str = KVM_PATH,
        lock: threading.RLock | None = None,
    ) -> None:
        vcpus = list(vcpus) if vcpus is not None else list(vm.vcpus)
        if not vcpus:
            raise KvmError("the transport needs at least one vCPU")
        self.vm = vm
        self.partition = partition
        self.lock = lock
        """The VM's device lock (see the class docstring); None: the acknowledge cycle takes none."""
        self.interrupts = interrupts if isinstance(interrupts, InterruptController) else None
        self._remote_interrupts = interrupts if isinstance(interrupts, RemoteInterruptController) else None
        memory = vm_memory(vm)
        self._guest = Guest(memory, translate=self.translate, segments=self.segments)
        self.out_rip_advanced = out_advances_rip(kvm_path)
        self.stops: list[VcpuStop] = []
        self.via_loop = 0
        """Completions received with :meth:`send_batch` (from the event loop)."""
        self.answer: InlineAnswer | None = None
        self.answer_decoded: DecodedAnswer | None = None
        """The dispatcher's inline entry once :meth:`start_inline` has been called, else None."""
        self._queue: ThreadToLoop[tuple[VcpuRunner, Any]] = ThreadToLoop(handoff, batch=POSTED_BATCH)
        self._runners = {
            v.index: VcpuRunner(self, v, memory=memory, regions=vm.regions, out_rip_advanced=self.out_rip_advanced,
                                posted_writes=posted_writes, takes_interrupts=interrupts is not None)
            for v in vcpus
        }  # fmt: skip
        for index, runner in self._runners.items():
            runner.builder = FrameBuilder(vp_index=index, partition=partition, out_rip_advanced=self.out_rip_advanced,
                                          read_linear=runner.reader.read)  # fmt: skip
        self._live = len(self._runners)
        self._started = False
        self._closed = False

    @property
    def runners(self) -> list[VcpuRunner]:
        return list(self._runners.values())

    @property
    def guest(self) -> Guest:
        """The VM's memory (its slots; ROM read-only), :meth:`translate` and :meth:`segments`."""
        return self._guest

    @property
    def intercepts(self) -> int:
        """Intercepts built from I/O exits, over all vCPUs."""
        return sum(runner.intercepts + runner.loop_intercepts for runner in self._runners.values())

    @property
    def posted(self) -> int:
        """Posted writes: OUTs whose vCPU went on without waiting for their completion."""
        return sum(runner.posted for runner in self._runners.values())

    @property
    def answered_inline(self) -> int:
        """Intercepts answered on the vCPU threads (synchronous handlers, no trip to the event loop)."""
        if self.answer is None:
            return 0
        pending = sum(len(runner.in_flight) + len(runner.batch) for runner in self._runners.values())
        return self.intercepts - self.via_loop - pending

    @property
    def slow_completions(self) -> int:
        """Completions applied by setting registers after KVM finished the instruction (see ``plan_completion``)."""
        return sum(runner.slow_completions for runner in self._runners.values())

    # -- from the threads ---------------------------------------------------------------------

    def put(self, item: tuple[VcpuRunner, Any], *, urgent: bool = True) -> None:
        """Queue an item for the loop; a posted write is not ``urgent``.

        See :meth:`~transports.kvm.handoff.ThreadToLoop.put`.
        """
        if not self._closed:
            self._queue.put(item, urgent=urgent)

    def wake_loop(self) -> None:
        """Have the loop look at the queue now (a vCPU waits for its posted writes)."""
        if not self._closed:
            self._queue.wake()

    def runner_finished(self, runner: VcpuRunner) -> None:
        if not self._closed:
            self._queue.put((runner, FINISHED))

    @property
    def acknowledge(self) -> Callable[[VcpuRunner], int | None] | None:
        """The acknowledge cycle for a vCPU thread to run itself: when answering inline with a local controller."""
        return self._acknowledge_here if self.answer is not None and self.interrupts is not None else None

    def _acknowledge_here(self, runner: VcpuRunner) -> int | None:
        # On the vCPU thread: the controller is a device model, so it runs under the VM's device lock.
        interrupts = self.interrupts
        assert interrupts is not None
        with self.lock if self.lock is not None else contextlib.nullcontext():
            if runner.interrupt_level and interrupts.pending_vector() is not None:
                return interrupts.acknowledge()
        return None

    # -- the interrupt line (any thread) --------------------------------------------------------

    def set_irq(self, line: int, level: bool) -> None:
        """The INTR input of VP ``line`` (the :class:`~dispatcher.IrqReceiver` protocol); safe from any thread."""
        runner = self._runners.get(line)
        if runner is None:
            raise ValueError(f"no VP {line} to take an interrupt line")
        runner.interrupt_level = level
        if level:
            runner.interrupt_raised()

    def stop(self, detail: str = "stopped by the VMM") -> None:
        """Stop every vCPU; :meth:`receive_batch` returns an empty batch once all have."""
        for runner in self._runners.values():
            runner.stop(detail)

    def stop_reading(self) -> None:
        """The dispatcher's graceful stop: :meth:`stop` every vCPU."""
        self.stop("the dispatcher stopped")

    # -- the dispatcher's side ----------------------------------------------------------------

    def start_inline(self, answer: InlineAnswer) -> None:
        """From now on each vCPU thread hands its intercepts to ``answer`` and applies the completions itself.

        Called by the dispatcher before the first :meth:`receive_batch`, which
        starts the vCPU threads; :meth:`receive_batch` then delivers no
        frames and returns ``[]`` once every vCPU thread has ended.
        """
        if self._started:
            raise KvmError("start_inline() must come before the vCPUs start (the first receive_batch())")
        self.answer = answer

    def start_decoded(self, answer: DecodedAnswer) -> None:
        """From now on each vCPU thread offers an IN or OUT it waits for to ``answer`` before building its frame."""
        if self._started:
            raise KvmError("start_decoded() must come before the vCPUs start (the first receive_batch())")
        self.answer_decoded = answer

    async def receive_batch(self) -> list[bytes]:
        if self._closed:
            return []
        if not self._started:
            self._started = True
            for runner in self._runners.values():
                runner.start()
        queue = self._queue
        while True:
            if queue.only_posted():
                # Only posted writes, fewer than a batch: let a batch build up, for at most POSTED_LATENCY.
                await queue.wait(_WINDOW_KICK if self._windows_waiting() else POSTED_LATENCY)
            frames = []
            for runner, item in queue.drain():
                if item is ACKNOWLEDGE and self._remote_interrupts is not None:
                    vector = await self._remote_interrupts.acknowledge_pending() if runner.interrupt_level else None
                    runner.inbox.put(vector)
                elif type(item) is list:
                    # A batch of posted writes from a vCPU thread that answers inline otherwise.
                    frames += [frame for capture in item if (frame := self._intercept(runner, capture)) is not None]
                elif (frame := self._take(runner, item)) is not None:
                    frames.append(frame)
            if frames:
                return frames
            if self._live == 0:
                return []
            # Posted writes wake the loop only in batches: look again after POSTED_LATENCY while any are out.
            # A requested interrupt window is not always reported promptly (on kvm-pvm only at the next
            # in-kernel exit, which a spinning guest may never make): kick such a vCPU every millisecond.
            runners = self._runners.values()
            outstanding = any(r.posted != r.completed for r in runners)
            waiting = self._windows_waiting()
            await queue.wait(_WINDOW_KICK if waiting else POSTED_LATENCY if outstanding else None)
            for runner in waiting:
                if runner.window_requested and runner.in_guest:
                    runner.vcpu.kick()
            if self.answer is not None:
                # A vCPU keeping posted writes for the dispatcher hands them over at its next exit; a guest that
                # makes none for a while is kicked out of KVM_RUN for it.
                now = time.perf_counter()
                for runner in runners:
                    if runner.batch and now - runner.batch_since >= POSTED_LATENCY:
                        runner.vcpu.kick()

    def _windows_waiting(self) -> list[VcpuRunner]:
        return [r for r in self._runners.values() if r.window_requested and r.interrupt_level]

    def _take(self, runner: VcpuRunner, item: Any) -> bytes | None:
        if isinstance(item, IoCapture):
            return self._intercept(runner, item)
        if item is ACKNOWLEDGE:
            vector = None
            if runner.interrupt_level and self.interrupts is not None and self.interrupts.pending_vector() is not None:
                vector = self.interrupts.acknowledge()
            runner.inbox.put(vector)
        elif item is FINISHED:
            self._finished(runner)
        return None  # POSTED: only a reason to look at the runners' batches (receive_batch)

    def _finished(self, runner: VcpuRunner) -> None:
        self._live -= 1
        if runner.result is not None:
            self.stops.append(runner.result)
            log.info("%s", runner.result)

    def _intercept(self, runner: VcpuRunner, capture: IoCapture) -> bytes | None:
        # Served through receive_batch (not inline): the loop thread builds the intercept.
        builder = runner.builder
        assert builder is not None
        posted = runner.posting and capture.plain_out
        runner.loop_intercepts += 1
        try:
            if posted:
                built = builder.simple(capture)
                assert built is not None  # a plain OUT decodes as a non-string OUT
                frame, template = built
                # A posted write needs only what its completion must confirm: RIP past the OUT, RAX unchanged.
                runner.in_flight.append(PostedOut(template.next_rip, capture.regs[0], capture.port, template.at))
                return frame
            simple = builder.simple_io(capture)
            if simple is not None:
                frame, record = simple
                runner.in_flight.append(record)
                return frame
            pending = builder.build(capture)
        except IoDecodeError as error:
            if posted:
                runner.completed += 1
            runner.stop(f"VP {runner.vp_index}: {error}", StopReason.ERROR)
            return None
        runner.in_flight.append(pending)
        return pending.frame

    async def send_batch(self, frames: Sequence[bytes]) -> None:
        """Apply completions from the loop (any thread may call this; the vCPU threads apply them)."""
        for frame in frames:
            self.deliver(frame, None)
            self.via_loop += 1

    def deliver(self, frame: bytes, here: VcpuRunner | None) -> Action | None:
        """Apply one completion to the vCPU it names (see :class:`~transports.kvm.runner.VcpuHost`).

        Raises :class:`~dispatcher.TransportError` for a frame that is not a completion.
        """
        # The usual completion of the usual intercept is checked on the frame's bytes; anything else decoded.
        partition, vp = frame_ids(frame)
        runner = self._runners.get(vp) if partition == self.partition else None
        if runner is not None and runner.in_flight:
            in_flight = runner.in_flight
            head = in_flight[0]
            if type(head) is SimpleIo:
                action = usual_action(head, frame)
                if action is not None:
                    in_flight.popleft()
                    if runner is here:
                        return action
                    runner.inbox.put(action)
                    return None
            elif type(head) is PostedOut and posted_confirmed(head, frame):
                in_flight.popleft()
                runner.completed += 1
                if runner.fencing and runner is not here:
                    runner.inbox.put(WAKE)
                return None
        try:
            completion = read_completion(frame)
        except FrameError as error:
            raise TransportError(f"KVM transport: not a completion: {error}") from error
        runner = self._runners.get(completion.vp_index)
        if runner is None or completion.source_partition != self.partition or not runner.in_flight:
            log.warning("completion for partition %d, VP %#x, which has nothing in flight",
                        completion.source_partition, completion.vp_index)  # fmt: skip
            return None
        pending = runner.in_flight.popleft()
        if isinstance(pending, PostedOut):
            runner.completed += 1
            next_rip, rax, port, at = pending
            named, rip = int(completion.registers), completion.rip  # a plain int: IntFlag arithmetic is slow
            if (
                completion.status in REFUSED
                or named & _NOT_OUT
                or named & _RIP_BIT == 0
                or rip != next_rip
                or (named & _RAX_BIT and completion.rax != rax)
            ):
                runner.stop(
                    f"the completion of a posted OUT to port {port:#x} at RIP {at:#x} asks for a state the "
                    f"guest has already left (status {int(completion.status)}, registers {named:#x}, "
                    f"RIP {rip:#x})",
                    StopReason.ERROR,
                )
            elif runner.fencing and runner is not here:
                runner.inbox.put(WAKE)
            return None
        if isinstance(pending, SimpleIo):
            builder = runner.builder
            assert builder is not None
            pending = builder.pending_of(pending)
        action = plan_completion(pending, completion, self._read_chunk)
        runner.slow_completions += action.registers is not None
        if runner is here:
            return action
        runner.inbox.put(action)
        return None

    def _read_chunk(self, pending: PendingIo) -> bytes:
        # The bytes KVM will store for an INS chunk, read back from guest memory in its order.
        size, count = pending.size, pending.count
        low = pending.chunk - (count - 1) * size if pending.reverse else pending.chunk
        data = self._runners[pending.vp_index].reader.read(low, size * count)
        if data is None:
            return b"\xff" * (size * count)  # not RAM: KVM's store ends up as dropped MMIO writes
        if pending.reverse and count > 1:
            data = b"".join(data[i : i + size] for i in range(len(data) - size, -1, -size))
        return data

    async def aclose(self) -> None:
        if self._closed:
            return
        self.stop("the transport was closed")
        with anyio.CancelScope(shield=True):
            stopped = time.monotonic()
            for runner in self._runners.values():
                while not runner.join(0):
                    if time.monotonic() - stopped >= _ABANDON_AFTER:
                        # Told to stop, a vCPU thread ends at once (it is kicked out of the guest and woken
                        # wherever it waits) unless device code it runs does not return (the dispatcher's
                        # watchdog has then answered for it): that must not keep the VM from closing.
                        runner.abandon()
                        self.stops.append(runner.abandoned_stop())
                        log.error("%s", self.stops[-1])
                        break
                    await anyio.sleep(0.01)
        self._closed = True
        for runner, item in self._queue.drain():
            if item is FINISHED:
                self._finished(runner)
        self._queue.close()

    # -- hooks for the dispatcher's string I/O (the thread that dispatches, while the VP waits) ------------

    def translate(self, partition: int, vp_index: int, linear: int, write: bool) -> int | None:
        """Guest-physical address of ``linear`` for VP ``vp_index`` (KVM_TRANSLATE once it pages)."""
        runner = self._runners.get(vp_index)
        return runner.reader.physical(linear) if runner is not None else None

    def segments(self, partition: int, vp_index: int, segment: Segment) -> SegmentRegister | None:
        """The VP's ES, CS, SS, DS, FS or GS as of its last exit."""
        runner = self._runners.get(vp_index)
        context = runner.context if runner is not None else None
        if context is None or not 0 <= segment <= 5:
            return None
        return (context.es, context.cs, context.ss, context.ds, context.fs, context.gs)[segment]
