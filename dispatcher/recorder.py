"""Recording a VM's device traffic into a trace file (:mod:`dispatcher.trace`) for replay.

A :class:`Recorder` is an engine observer: give it to the dispatcher that
serves the VM and every intercept and completion is written, in the order
the devices saw them::

    writer = TraceWriter("run.trace", new_metadata("api", machine="mymodule:build"))
    recorder = Recorder(writer, clock=clock)
    dispatcher = Dispatcher(router, observer=recorder)
    ...
    recorder.close()

Everything else that moves the devices goes through it too, so that a
replay repeats it: :meth:`Recorder.timed` wraps what a clock polls (each
poll is a :class:`~dispatcher.trace_records.ClockAdvance`),
:meth:`Recorder.interrupts` wraps an interrupt controller (each acknowledge
cycle is an :class:`~dispatcher.trace_records.Acknowledge`),
:meth:`Recorder.tap` an interrupt line (each change an
:class:`~dispatcher.trace_records.IrqEdge`) and :meth:`Recorder.guest` the
guest memory string I/O uses (:class:`~dispatcher.trace_records.MemoryRead`,
:class:`~dispatcher.trace_records.MemoryWrite`).

Times: ``virtual_ns`` is the devices' clock, read from a
:class:`~dispatcher.clock.VirtualClock` (or any object with ``now_ns``), or
from a ``clock()`` in seconds, or else the host's monotonic time since the
recorder started; ``real_ns`` is always the latter. With
``follow_real_time`` a virtual clock is moved to the host's time (from the
recorder's start) as each intercept arrives, before it is recorded: a VM
that runs on real time, recorded so that its replay is exact.

Calls are expected under the VM's device lock, as the dispatcher makes
them; the writer has its own lock as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .clock import SteppedClock, Timed
from .guest import Guest
from .guest_memory import GuestMemory, MemoryRegion
from .irq import InterruptController, IrqLine, tap_line
from .trace import Kind, TraceWriter, acknowledge_payload, edge_payload, memory_payload

__all__ = ["Recorder"]


class Recorder:
    """Writes what reaches a VM's devices to ``writer``; an :class:`~dispatcher.EngineObserver`.

    ``clock`` is the devices' clock (see the module docstring for how each
    kind is read); ``follow_real_time`` (needs a :class:`~dispatcher.clock.SteppedClock`)
    moves it to the host's time at each intercept.
    """

    def __init__(
        self,
        writer: TraceWriter,
        *,
        clock: SteppedClock | Callable[[], float] | None = None,
        follow_real_time: bool = False,
        real_clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.writer = writer
        self.clock = clock
        self._stepped = clock if isinstance(clock, SteppedClock) else None
        if follow_real_time and self._stepped is None:
            raise ValueError("follow_real_time needs a clock with now_ns and advance_to (a VirtualClock)")
        self.follow_real_time = follow_real_time
        self._real_clock = real_clock
        self._real_start = real_clock()
        self._clock_start = self._stepped.now_ns if self._stepped is not None else 0
        self._seconds: Callable[[], float] | None = None
        if clock is not None and not isinstance(clock, SteppedClock):
            self._seconds = clock
        self._record = writer.record

    # -- time -------------------------------------------------------------------------------------

    def real_ns(self) -> int:
        """The host's monotonic time since the recorder started, in ns."""
        return self._real_clock() - self._real_start

    def virtual_ns(self) -> int:
        """The devices' clock now, in ns."""
        if self._stepped is not None:
            return self._stepped.now_ns
        if self._seconds is not None:
            return round(self._seconds() * 1e9)
        return self.real_ns()

    def host_ns(self) -> int:
        """The host's time in the clock's terms: where :meth:`catch_up` would move a followed clock now."""
        return self._clock_start + self.real_ns()

    def catch_up(self) -> int:
        """With ``follow_real_time``: move the clock to the host's time (never back). Returns the clock's time."""
        stepped = self._stepped
        if stepped is None:
            return self.virtual_ns()
        if self.follow_real_time:
            target = self.host_ns()
            if target > stepped.now_ns:
                stepped.advance_to(target)
        return stepped.now_ns

    # -- the engine's observer --------------------------------------------------------------------

    def intercept(self, frame: bytes) -> None:
        """An intercept frame arrived (the clock first follows real time, if told to)."""
        if self.follow_real_time:
            self.catch_up()
        self._record(Kind.INTERCEPT, self.virtual_ns(), self.real_ns(), bytes(frame))

    def completion(self, frame: bytes) -> None:
        """A completion was made."""
        self._record(Kind.COMPLETION, self.virtual_ns(), self.real_ns(), bytes(frame))

    # -- what else moves the devices ------------------------------------------------------------

    def clock_advanced(self) -> None:
        """The devices' clock moved and the machine is about to be polled: a ClockAdvance at the clock's time."""
        self._record(Kind.CLOCK_ADVANCE, self.virtual_ns(), self.real_ns())

    def acknowledged(self, vector: int | None) -> None:
        """The interrupt acknowledge cycle ran and gave ``vector`` (None: nothing was pending)."""
        self._record(Kind.ACKNOWLEDGE, self.virtual_ns(), self.real_ns(), acknowledge_payload(vector))

    def set_irq(self, line: int, level: bool) -> None:
        """Interrupt line ``line`` went to ``level`` (a recorder is an :class:`~dispatcher.IrqReceiver`)."""
        self._record(Kind.IRQ_EDGE, self.virtual_ns(), self.real_ns(), edge_payload(line, level))

    def memory_read(self, address: int, data: bytes) -> None:
        self._record(Kind.MEMORY_READ, self.virtual_ns(), self.real_ns(), memory_payload(address, data))

    def memory_written(self, address: int, data: bytes) -> None:
        self._record(Kind.MEMORY_WRITE, self.virtual_ns(), self.real_ns(), memory_payload(address, data))

    # -- wrappers -------------------------------------------------------------------------------

    def timed(self, timed: Timed) -> Timed:
        """``timed`` whose every ``poll()`` is first recorded as a ClockAdvance: give this to the clock's ``watch``."""
        return _RecordedTimed(self, timed)

    def interrupts(self, controller: InterruptController) -> InterruptController:
        """``controller`` whose every ``acknowledge()`` is recorded with the vector it gave."""
        return _RecordedInterrupts(self, controller)

    def tap(self, line: IrqLine) -> IrqLine:
        """Record every change of ``line`` (as IrqEdge of its number), still forwarding it to its receiver."""
        return tap_line(line, self)

    def memory(self, memory: GuestMemory) -> GuestMemory:
        """``memory`` with every read and write recorded (MemoryRead, MemoryWrite)."""
        return _RecordedMemory(self, memory)

    def guest(self, guest: Guest) -> Guest:
        """``guest`` whose memory is recorded (:meth:`memory`)."""
        return Guest(self.memory(guest.memory), translate=guest.translate, segments=guest.segments)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        """Close the trace file (its end record written)."""
        self.writer.close()


class _RecordedTimed:
    __slots__ = ("_recorder", "_timed")

    def __init__(self, recorder: Recorder, timed: Timed) -> None:
        self._recorder = recorder
        self._timed = timed

    def next_due(self) -> float | None:
        return self._timed.next_due()

    def poll(self) -> object:
        self._recorder.clock_advanced()
        return self._timed.poll()


class _RecordedInterrupts:
    __slots__ = ("_controller", "_recorder")

    def __init__(self, recorder: Recorder, controller: InterruptController) -> None:
        self._recorder = recorder
        self._controller = controller

    def pending_vector(self) -> int | None:
        return self._controller.pending_vector()

    def acknowledge(self) -> int:
        vector = self._controller.acknowledge()
        self._recorder.acknowledged(vector)
        return vector


class _RecordedMemory(GuestMemory):
    def __init__(self, recorder: Recorder, memory: GuestMemory) -> None:
        self._recorder = recorder
        self.inner = memory

    def regions(self) -> tuple[MemoryRegion, ...]:
        return self.inner.regions()

    def check(self, address: int, length: int, *, write: bool = False) -> int:
        return self.inner.check(address, length, write=write)

    def read(self, address: int, length: int) -> bytes:
        data = self.inner.read(address, length)
        self._recorder.memory_read(address, data)
        return data

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        self.inner.write(address, data)
        self._recorder.memory_written(address, bytes(data))
