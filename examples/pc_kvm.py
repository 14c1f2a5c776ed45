"""A PC on KVM: the example devices (:func:`examples.pc_devices.build_pc`) behind a real vCPU.

::

    result = anyio.run(run_pc, PcConfig(bios=Path("/usr/share/seabios/bios.bin").read_bytes(), timeout=60))
    print(result.reason, result.exit_status)

Memory: RAM from 0 (``memory_size``), the BIOS image read-only just below
4 GiB where the reset vector fetches it, and a copy in RAM just below
1 MiB (the "shadowed" BIOS that PC firmware runs from and writes to). One
vCPU starts at the reset vector. The machine loop brings the timers up to
date (PIT, RTC, UART) at their next due time, at least every
``poll_interval``, so a halted vCPU is woken by IRQ 0 as on a PC; the
i8259A pair's INTR output goes to the vCPU, which acknowledges and injects
(:mod:`transports.kvm.transport`).

Threads: the device handlers run on the vCPU thread (the transport answers
inline), the timers on the event loop; both, and the acknowledge cycle,
hold the dispatcher's :attr:`~dispatcher.Dispatcher.lock`, so the devices
never run on two threads at once.

It ends when the guest writes the exit device (``exit_status``), asks for a
reset, the vCPU stops (triple fault, HLT with interrupts off, an error), or
``timeout`` seconds pass (:attr:`PcResult.reason` says which).

Recording (``PcConfig.record``, a trace file path): the devices then run on
a :class:`~dispatcher.VirtualClock` that follows the host's time, moved
only where the trace says (each intercept's arrival, each pass of the
machine loop), so that :func:`replay_machine` and the trace repeat the run
exactly: the RTC's start time, RAM size and disk are in the trace's
metadata, and every poll of the timers and every interrupt acknowledge
cycle is recorded with the clock's time.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from dispatcher import Acquire, Dispatcher, Guest, IrqLine, Recorder, TraceWriter, VirtualClock, new_metadata
from transports.kvm import KvmTransport, StopReason, Vm

from .ata import AtaDisk
from .pc_devices import PC, build_pc

__all__ = [
    "BIOS_TOP",
    "REPLAY_MACHINE",
    "Outcome",
    "PcConfig",
    "PcResult",
    "ReplayPc",
    "TimeKeeper",
    "build_vm",
    "replay_machine",
    "run_pc",
]

MiB = 1 << 20
BIOS_TOP = 1 << 32  # the BIOS ROM ends at 4 GiB; the reset vector is its last 16 bytes
LOW_BIOS_TOP = 1 * MiB


def _discard(data: bytes) -> None:
    pass


@dataclass
class PcConfig:
    """What to boot and how. ``disk`` is an image path (or bytes) for ATA device 0 on the primary channel."""

    bios: bytes
    disk: str | bytearray | None = None
    memory_size: int = 64 * MiB
    timeout: float | None = 60.0
    serial_sink: Callable[[bytes], object] = _discard
    debug_sink: Callable[[bytes], object] = _discard
    poll_interval: float = 0.005
    posted_writes: bool = True
    kvm_path: str = "/dev/kvm"
    until: bytes | None = None  # stop (successfully) once the console output contains this
    record: str | None = None  # a trace file to record the run to (see the module docstring)
    record_metadata: dict[str, Any] = field(default_factory=dict)  # more for the trace's metadata


@dataclass
class PcResult:
    """How the run ended: ``reason`` in words, ``exit_status`` if the guest wrote the exit device."""

    reason: str
    exit_status: int | None = None
    timed_out: bool = False
    seen: bool = False  # ``until`` appeared in the output
    elapsed: float = 0.0
    stops: list[str] = field(default_factory=list)
    intercepts: int = 0


def build_vm(config: PcConfig) -> Vm:
    """A VM with RAM, the BIOS ROM below 4 GiB and its shadow copy below 1 MiB, and one vCPU at reset."""
    bios = config.bios
    if not bios or len(bios) % 0x10000 or len(bios) > 16 * MiB:
        raise ValueError(f"a BIOS image is a multiple of 64 KiB up to 16 MiB, not {len(bios)} bytes")
    if config.memory_size < 2 * MiB or config.memory_size % MiB:
        raise ValueError(f"memory_size must be a whole number of MiB, at least 2, not {config.memory_size:#x}")
    vm = Vm(config.kvm_path)
    try:
        vm.add_ram(0, config.memory_size, name="ram")
        vm.add_rom(BIOS_TOP - len(bios), bios, name="bios")
        low = bios[-min(len(bios), 128 * 1024) :]  # the top 128 KiB also appear at 0xE0000-0xFFFFF
        vm.write_memory(LOW_BIOS_TOP - len(low), low)
        vm.create_vcpu()  # KVM's reset state: CS F000 (base FFFF0000), RIP FFF0
    except BaseException:
        vm.close()
        raise
    return vm


class _Watch:
    """Looks for a text in what the guest prints (serial and debug console together)."""

    def __init__(self, text: bytes | None, found: Callable[[], object]) -> None:
        self.text = text
        self.found = found
        self.tail = b""

    def wrap(self, sink: Callable[[bytes], object]) -> Callable[[bytes], object]:
        if self.text is None:
            return sink

        def watched(data: bytes) -> None:
            sink(data)
            assert self.text is not None
            self.tail = (self.tail + data)[-len(self.text) - 64 :]
            if self.text in self.tail:
                self.tail = b""
                self.found()

        return watched


class TimeKeeper:
    """Brings the PC's timers up to date, delivering IRQ 0 periods the process missed.

    The devices compute their state from the clock when asked, and a PIT
    looked at late shows one edge for however many periods passed. This
    machine's process is regularly stopped for a second or more, and a guest
    that counts IRQ 0 ticks to measure time (a BIOS waiting 2.5 s for a key
    press counts 45) would see time slow down. So, like KVM's in-kernel PIT
    with reinjection, each missed period is delivered later, one edge per
    tick the guest has taken (the PIC's IRR bit 0 clear), up to ten seconds'
    worth. The guest's tick count follows real time; nothing is skipped.
    """

    MAX_OWED = 182  # about ten seconds of the BIOS's 18.2 Hz tick
    CATCH_UP = 0.001  # how soon to look again while ticks are owed

    def __init__(self, pc: PC, clock: Callable[[], float] = time.monotonic) -> None:
        self.pc = pc
        self.clock = clock
        """The devices' clock (seconds): what :meth:`next_due` counts from."""
        self.owed = 0

    def poll(self) -> None:
        pc = self.pc
        edges = pc.pit.update()
        if edges > 1:
            self.owed = min(self.owed + edges - 1, self.MAX_OWED)
        pc.rtc.update()
        pc.uart.poll()
        if self.owed and not pc.pic.master.irr & 1:
            line = pc.pit.irq
            level = line.level
            line.lower()
            line.raise_()
            line.set(level)
            self.owed -= 1

    def next_due(self) -> float | None:
        """When :meth:`poll` next has something to do (by the devices' clock), or None."""
        due = self.pc.next_due()
        if self.owed:
            soon = self.clock() + self.CATCH_UP
            due = soon if due is None else min(due, soon)
        return due


async def _keep_time(
    keeper: TimeKeeper, interval: float, lock: threading.RLock, recorder: Recorder | None = None
) -> None:
    # The devices have no threads: bring their interrupt lines up to date when they are due. Their handlers run
    # on the vCPU thread meanwhile, so this holds the VM's device lock (taken without blocking the event loop).
    # Recording, the devices' virtual clock is first moved to the host's time, and the poll recorded at it.
    while True:
        await Acquire(lock, anyio.lowlevel.checkpoint)  # while a handler holds it, the loop runs
        try:
            if recorder is not None:
                recorder.catch_up()
                recorder.clock_advanced()
            keeper.poll()
            due = keeper.next_due()
        finally:
            lock.release()
        now = time.monotonic() if recorder is None else recorder.host_ns() / 1e9
        await anyio.sleep(interval if due is None else min(max(due - now, 0.0), interval))


class Outcome:
    """How a run is ending: the first reason given wins, and every vCPU is told to stop."""

    def __init__(self, config: PcConfig) -> None:
        self.started = time.monotonic()
        self.transport: KvmTransport | None = None
        self.result: PcResult | None = None
        self.watch = _Watch(config.until, lambda: self.finish(f"the console showed {config.until!r}", seen=True))

    def finish(
        self, reason: str, *, exit_status: int | None = None, seen: bool = False, timed_out: bool = False
    ) -> None:
        if self.result is None:
            self.result = PcResult(reason, exit_status, timed_out, seen)
        if self.transport is not None:
            self.transport.stop(reason)

    def exited(self, status: int) -> None:
        self.finish(f"the guest wrote the exit device: status {status}", exit_status=status)

    def reset(self) -> None:
        self.finish("the guest asked for a reset (not implemented: the machine stops)")

    def done(self) -> PcResult:
        """The result once the vCPUs have stopped."""
        transport = self.transport
        stops = list(transport.stops) if transport is not None else []
        if self.result is None:
            failures = [stop for stop in stops if stop.reason is not StopReason.STOPPED]
            self.result = PcResult(str(failures[0]) if failures else "the vCPU stopped")
        self.result.elapsed = time.monotonic() - self.started
        self.result.stops = [str(stop) for stop in stops]
        self.result.intercepts = transport.intercepts if transport is not None else 0
        return self.result


class _RecordedKvmTransport(KvmTransport):
    """The VM's vCPUs, with what string I/O reads and writes in guest memory recorded."""

    def __init__(self, vm: Vm, recorder: Recorder, **options: Any) -> None:
        super().__init__(vm, **options)
        self._recorded_guest = recorder.guest(super().guest)

    @property
    def guest(self) -> Guest:
        return self._recorded_guest


REPLAY_MACHINE = "examples.pc:replay_machine"
"""The factory a trace of this PC names for its replay (:func:`replay_machine`)."""


def _recording_metadata(config: PcConfig, start_time: datetime) -> dict[str, Any]:
    disk = os.path.abspath(config.disk) if isinstance(config.disk, str) else None
    if isinstance(config.disk, bytearray):
        raise ValueError("a PC recorded for replay takes its disk as an image path, not as bytes")
    machine_args = {"memory_size": config.memory_size, "disk": disk, "start_time": start_time.isoformat()}
    return new_metadata(
        "examples.pc", machine=REPLAY_MACHINE, machine_args=machine_args, clock="virtual", start_ns=0,
        **config.record_metadata,
    )  # fmt: skip


async def run_pc(
    config: PcConfig, *, dispatcher_factory: Callable[[KvmTransport, PC], Dispatcher] | None = None
) -> PcResult:
    """Boot the PC and run it until it ends; see the module docstring."""
    outcome = Outcome(config)
    intr = IrqLine(name="INTR")
    recorder: Recorder | None = None
    clock: Callable[[], float] = time.monotonic
    start_time = datetime.now(UTC)
    if config.record is not None:
        virtual = VirtualClock()
        clock = virtual
        writer = TraceWriter(config.record, _recording_metadata(config, start_time))
        recorder = Recorder(writer, clock=virtual, follow_real_time=True)
    try:
        vm = build_vm(config)
    except BaseException:
        if recorder is not None:
            recorder.close()
        raise
    with vm:
        disk = AtaDisk(config.disk) if config.disk is not None else None
        try:
            pc = build_pc(
                memory_size=config.memory_size,
                disk=disk,
                serial_sink=outcome.watch.wrap(config.serial_sink),
                debug_sink=outcome.watch.wrap(config.debug_sink),
                clock=clock,
                start_time=start_time,
                intr=intr,
                on_exit=outcome.exited,
                on_reset=outcome.reset,
            )
            options: dict[str, Any] = {"posted_writes": config.posted_writes, "kvm_path": config.kvm_path}
            if recorder is None:
                transport = KvmTransport(vm, interrupts=pc.pic, **options)
            else:
                transport = _RecordedKvmTransport(vm, recorder, interrupts=recorder.interrupts(pc.pic), **options)
            outcome.transport = transport
            if recorder is not None:
                for line in pc.irq_lines:
                    recorder.tap(line)
            intr.receiver, intr.line = transport, 0
            transport.set_irq(0, intr.level)
            dispatcher = dispatcher_factory(transport, pc) if dispatcher_factory is not None else Dispatcher(pc.router)
            if recorder is not None:
                if dispatcher.observer is not None:
                    raise ValueError("a recorded PC's dispatcher already has an observer")
                dispatcher.observer = recorder  # read when serve() makes the connection's engine
            # The interrupt acknowledge cycle (the PIC) runs on the vCPU thread: under the VM's device lock.
            transport.lock = dispatcher.lock
            async with anyio.create_task_group() as tg:
                keeper = TimeKeeper(pc, clock)
                tg.start_soon(_keep_time, keeper, config.poll_interval, dispatcher.lock, recorder)
                with anyio.move_on_after(config.timeout if config.timeout is not None else float("inf")) as scope:
                    await dispatcher.serve(transport)
                if scope.cancelled_caught:
                    outcome.finish(f"timed out after {config.timeout:g} s", timed_out=True)
                    await transport.aclose()
                tg.cancel_scope.cancel()
        finally:
            if disk is not None:
                disk.close()
            if recorder is not None:
                recorder.close()
    return outcome.done()


class ReplayPc:
    """The example PC as a replay drives it: its router, ``poll()`` (the machine loop's) and ``acknowledge()``."""

    def __init__(self, pc: PC, keeper: TimeKeeper) -> None:
        self.pc = pc
        self.router = pc.router
        self.keeper = keeper
        self.irq_lines = pc.irq_lines
        """The lines whose edges the trace recorded, compared on replay."""

    def poll(self) -> None:
        """What a pass of the machine loop does: bring the timers up to date, deliver an owed IRQ 0."""
        self.keeper.poll()

    def next_due(self) -> float | None:
        return self.keeper.next_due()

    def acknowledge(self) -> int | None:
        """The vCPU's interrupt acknowledge cycle: the vector, or None if nothing is pending."""
        pic = self.pc.pic
        return pic.acknowledge() if pic.pending_vector() is not None else None


def replay_machine(
    clock: Callable[[], float],
    *,
    memory_size: int = 64 * MiB,
    disk: str | None = None,
    start_time: str | None = None,
) -> ReplayPc:
    """The PC a recorded run of :func:`run_pc` had, on ``clock``, for a replay of its trace.

    The keyword arguments are the trace's ``machine_args``. The disk image
    is read into memory: a replay never writes the file.
    """
    image = AtaDisk(bytearray(Path(disk).read_bytes())) if disk is not None else None
    when = datetime.fromisoformat(start_time) if start_time is not None else None
    pc = build_pc(memory_size=memory_size, disk=image, clock=clock, start_time=when)
    return ReplayPc(pc, TimeKeeper(pc, clock))
