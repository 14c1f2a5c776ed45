"""Test a device model the way a guest would use it: a fake VMM in process.

:class:`FakePartition` runs a real :class:`~dispatcher.Dispatcher` over the
in-memory transport; its :class:`FakeVP` objects build real intercept frames
with realistic register state, send them, and apply each completion to their
own RAX and RIP::

    async with FakePartition(router) as partition:
        vp = partition.vp(0)
        await vp.outb(0x3F8, 0x41)
        assert await vp.inb(0x3FD) & 0x20

String I/O runs against the partition's guest memory with the VP's RCX,
RSI, RDI, RFLAGS.DF and segment registers, re-executing a REP instruction
until it completes, as a VMM does::

    memory = BufferMemory([(0, bytearray(0x10000))])
    async with FakePartition(router, memory=memory) as partition:
        vp = partition.vp(0)
        vp.rdi, vp.rcx = 0x8000, 256
        await vp.insw(0x1F0, rep=True)  # one sector into 0x8000..0x81FF

Time stands still in a partition: its ``clock`` is a
:class:`~dispatcher.clock.VirtualClock`, which the devices are built with and
which moves only when the test moves it, running every timer and watched
device poll that falls due on the way, under the dispatcher's device lock::

    clock = VirtualClock()
    pc = build_pc(clock=clock)
    clock.watch(pc)  # polled at every pc.next_due()
    async with FakePartition(pc.router, clock=clock) as partition:
        vp = partition.vp(0)
        await vp.outb(0x43, 0x34)  # PIT channel 0, mode 2 ...
        partition.advance(1_000_000)  # ... and 1 ms of guest time passes

With the package installed, pytest gets the fixtures ``fake_partition`` and
``fake_vp``, built from a ``router`` fixture that the test module supplies,
and ``virtual_clock``, the partition's clock.
"""

from __future__ import annotations

import enum
import math
from types import TracebackType

import anyio

from dispatcher import (
    DEFAULT_MAX_ELEMENTS,
    AccessInfo,
    AccessType,
    Completion,
    Dispatcher,
    DispatchError,
    ExecutionState,
    Guest,
    GuestMemory,
    IoPortInterceptMessage,
    Recorder,
    Registers,
    Router,
    Segment,
    SegmentAttributes,
    SegmentRegister,
    Status,
    Translate,
    Transport,
    decode_completion,
    encode_io_instruction,
    identity_translation,
)
from dispatcher.clock import VirtualClock

from .conformance import check_transport
from .memory import memory_transport_pair

__all__ = ["CompletionError", "CpuMode", "FakePartition", "FakeVP", "check_transport"]


class CpuMode(enum.Enum):
    """The execution mode a fake VP reports: it sets CR0.PE, EFER.LMA and CS.L/D."""

    REAL = "real"
    PROTECTED = "protected"
    LONG = "long"


_MODE_STATE = {
    CpuMode.REAL: (ExecutionState.build(), SegmentAttributes(0x009B), 0x7C00),
    CpuMode.PROTECTED: (ExecutionState.build(cr0_pe=True), SegmentAttributes(0xC09B), 0x0010_0000),
    CpuMode.LONG: (ExecutionState.build(cr0_pe=True, efer_lma=True), SegmentAttributes(0xA09B), 0x0040_0000),
}


# Per mode: CS limit and selector, the data segments' default, and the
# default operand and address sizes (bytes, bits).
_MODE_SEGMENTS = {
    CpuMode.REAL: (0xFFFF, 0, SegmentRegister(0, 0xFFFF, 0, SegmentAttributes(0x93)), 2, 16),
    CpuMode.PROTECTED: (0xFFFF_FFFF, 0x8, SegmentRegister(0, 0xFFFF_FFFF, 0x10, SegmentAttributes(0xC093)), 4, 32),
    CpuMode.LONG: (0xFFFF_FFFF, 0x8, SegmentRegister(0, 0xFFFF_FFFF, 0x10, SegmentAttributes(0xC093)), 4, 64),
}
_MASK64 = (1 << 64) - 1


class CompletionError(DispatchError):
    """A completion came back with a status other than COMPLETED."""

    def __init__(self, completion: Completion) -> None:
        super().__init__(
            f"VP {completion.vp_index}: port {completion.port_number:#x} completed with "
            f"{completion.status.name} (detail {completion.detail:#x})"
        )
        self.completion = completion


class FakeVP:
    """A virtual processor that executes IN, OUT, INS and OUTS as guest code would.

    Registers live in attributes (``rax``, ``rip``, ``rflags``; for string
    I/O ``rcx``, ``rsi``, ``rdi`` and the segment registers ``ds``, ``es``,
    and ``ss``, ``fs``, ``gs``, which the intercept does not carry and the
    partition supplies on request when set); each access sends an intercept
    carrying them and applies the completion. With ``strict`` (the
    partition's default) a completion that is not COMPLETED raises
    :class:`CompletionError` after it has been applied.
    """

    def __init__(self, partition: FakePartition, index: int, mode: CpuMode) -> None:
        self.partition = partition
        self.index = index
        self.mode = mode
        self.execution_state, self.cs_attributes, self.rip = _MODE_STATE[mode]
        self.rax = 0
        self.rflags = 0x2
        self.rcx = self.rsi = self.rdi = 0
        self.ds = self.es = _MODE_SEGMENTS[mode][2]
        self.ss: SegmentRegister | None = None
        self.fs: SegmentRegister | None = None
        self.gs: SegmentRegister | None = None
        self.last_completion: Completion | None = None
        self._lock = anyio.Lock()

    @property
    def cs(self) -> SegmentRegister:
        """The code segment this VP's mode implies."""
        limit, selector, *_ = _MODE_SEGMENTS[self.mode]
        return SegmentRegister(0, limit, selector, self.cs_attributes)

    @property
    def code_bits(self) -> int:
        """The code size of this VP's mode: 16, 32 or 64."""
        return _MODE_SEGMENTS[self.mode][4]

    async def access(self, port: int, size: int, *, write: bool) -> Completion:
        """Execute one IN (``write=False``) or OUT of ``size`` bytes using the current RAX."""
        message = IoPortInterceptMessage(
            port_number=port,
            access_type=AccessType.WRITE if write else AccessType.READ,
            access_info=AccessInfo.build(size),
            rax=self.rax,
            vp_index=self.index,
            source_partition=self.partition.partition_id,
            # An imm8 port where the port fits one (as compilers emit), else the DX form.
            instruction_length=len(
                encode_io_instruction(write=write, size=size, bits=self.code_bits, port=port if port <= 0xFF else None)
            ),
            execution_state=self.execution_state,
            cs_segment=self.cs,
            rip=self.rip,
            rflags=self.rflags,
        )
        return await self._execute(message)

    async def _execute(self, message: IoPortInterceptMessage) -> Completion:
        async with self._lock:
            completion = await self.partition.exchange(self.index, message.to_bytes())
        self.apply(completion)
        if self.partition.strict and completion.status is not Status.COMPLETED:
            raise CompletionError(completion)
        return completion

    def apply(self, completion: Completion) -> None:
        """Set the registers the completion names, as a VMM would."""
        self.last_completion = completion
        registers = completion.registers
        if registers & Registers.RIP:
            self.rip = completion.rip
        if registers & Registers.RAX:
            self.rax = completion.rax
        if registers & Registers.RCX:
            self.rcx = completion.rcx
        if registers & Registers.RSI:
            self.rsi = completion.rsi
        if registers & Registers.RDI:
            self.rdi = completion.rdi

    def string_instruction(
        self,
        size: int,
        *,
        write: bool,
        rep: bool = False,
        segment: Segment | None = None,
        address_size: int | None = None,
    ) -> bytes:
        """The bytes of INS (``write=False``) or OUTS of ``size``-byte elements in this VP's mode.

        Adds the operand-size prefix when ``size`` is not the mode's default,
        the address-size prefix when ``address_size`` (16, 32 or 64 bits) is
        not, a segment override for ``segment``, and REP.
        """
        allowed = (32, 64) if self.mode is CpuMode.LONG else (16, 32)
        if address_size is not None and address_size not in allowed:
            raise ValueError(f"a {self.mode.value}-mode VP has address sizes {allowed}, not {address_size}")
        return encode_io_instruction(
            write=write,
            size=size,
            bits=self.code_bits,
            string=True,
            rep=rep,
            address_size=address_size,
            override=segment,
        )

    async def string(
        self,
        port: int,
        size: int,
        *,
        write: bool,
        rep: bool = False,
        segment: Segment | None = None,
        address_size: int | None = None,
    ) -> Completion:
        """Execute INS (``write=False``) or OUTS through DX = ``port`` with the current registers.

        A REP instruction is re-executed while a completion leaves RIP and
        moves RCX, as a VMM re-enters the VP; returns the last completion.
        """
        instruction = self.string_instruction(size, write=write, rep=rep, segment=segment, address_size=address_size)
        while True:
            message = IoPortInterceptMessage(
                port_number=port,
                access_type=AccessType.WRITE if write else AccessType.READ,
                access_info=AccessInfo.build(size, string_op=True, rep_prefix=rep),
                rax=self.rax,
                vp_index=self.index,
                source_partition=self.partition.partition_id,
                instruction_length=len(instruction),
                instruction_bytes=instruction,
                execution_state=self.execution_state,
                cs_segment=self.cs,
                rip=self.rip,
                rflags=self.rflags,
                ds_segment=self.ds,
                es_segment=self.es,
                rcx=self.rcx & _MASK64,
                rsi=self.rsi & _MASK64,
                rdi=self.rdi & _MASK64,
            )
            completion = await self._execute(message)
            if completion.registers & Registers.RIP or not completion.registers & Registers.RCX:
                return completion

    def segment(self, segment: Segment) -> SegmentRegister | None:
        """This VP's SS, FS or GS if set (what the partition answers when the dispatcher asks)."""
        return {Segment.SS: self.ss, Segment.FS: self.fs, Segment.GS: self.gs}.get(segment)

    async def _out(self, port: int, size: int, value: int) -> None:
        mask = (1 << 8 * size) - 1
        self.rax = (self.rax & ~mask & (1 << 64) - 1) | (value & mask)
        await self.access(port, size, write=True)

    async def _in(self, port: int, size: int) -> int:
        await self.access(port, size, write=False)
        return self.rax & (1 << 8 * size) - 1

    async def outb(self, port: int, value: int) -> None:
        """``out dx, al`` with AL = value."""
        await self._out(port, 1, value)

    async def outw(self, port: int, value: int) -> None:
        """``out dx, ax`` with AX = value."""
        await self._out(port, 2, value)

    async def outl(self, port: int, value: int) -> None:
        """``out dx, eax`` with EAX = value."""
        await self._out(port, 4, value)

    async def inb(self, port: int) -> int:
        """``in al, dx``; returns AL."""
        return await self._in(port, 1)

    async def inw(self, port: int) -> int:
        """``in ax, dx``; returns AX."""
        return await self._in(port, 2)

    async def inl(self, port: int) -> int:
        """``in eax, dx``; returns EAX."""
        return await self._in(port, 4)

    async def insb(self, port: int, *, rep: bool = False, address_size: int | None = None) -> Completion:
        """``[rep] insb``: bytes from ``port`` to ES:[rDI]."""
        return await self.string(port, 1, write=False, rep=rep, address_size=address_size)

    async def insw(self, port: int, *, rep: bool = False, address_size: int | None = None) -> Completion:
        """``[rep] insw``: words from ``port`` to ES:[rDI]."""
        return await self.string(port, 2, write=False, rep=rep, address_size=address_size)

    async def insl(self, port: int, *, rep: bool = False, address_size: int | None = None) -> Completion:
        """``[rep] insd``: dwords from ``port`` to ES:[rDI]."""
        return await self.string(port, 4, write=False, rep=rep, address_size=address_size)

    async def outsb(
        self, port: int, *, rep: bool = False, segment: Segment | None = None, address_size: int | None = None
    ) -> Completion:
        """``[rep] outsb``: bytes from DS:[rSI] (or ``segment``:[rSI]) to ``port``."""
        return await self.string(port, 1, write=True, rep=rep, segment=segment, address_size=address_size)

    async def outsw(
        self, port: int, *, rep: bool = False, segment: Segment | None = None, address_size: int | None = None
    ) -> Completion:
        """``[rep] outsw``: words from DS:[rSI] (or ``segment``:[rSI]) to ``port``."""
        return await self.string(port, 2, write=True, rep=rep, segment=segment, address_size=address_size)

    async def outsl(
        self, port: int, *, rep: bool = False, segment: Segment | None = None, address_size: int | None = None
    ) -> Completion:
        """``[rep] outsd``: dwords from DS:[rSI] (or ``segment``:[rSI]) to ``port``."""
        return await self.string(port, 4, write=True, rep=rep, segment=segment, address_size=address_size)


class FakePartition:
    """A partition of fake VPs wired to a real Dispatcher over the in-memory transport.

    Use it as an async context manager; leaving it stops the dispatcher
    gracefully. ``dispatcher`` may be given to inspect its statistics. There
    is no handler deadline unless one is given: a test's outcome must not
    depend on how busy the machine is.

    ``memory`` is the guest memory string I/O uses (shared with the test);
    ``translate`` is the dispatcher's translation hook (by default the fake
    guest's page tables map every address to itself; None means no hook);
    ``max_elements`` bounds the elements one intercept moves. The dispatcher
    learns SS, FS and GS from the VPs' attributes.

    ``clock`` is the devices' time (by default a new
    :class:`~dispatcher.clock.VirtualClock` at 0); a clock without a lock
    gets the dispatcher's device lock, so its timers and polls run as
    handlers do. :meth:`advance`, :meth:`advance_to` and
    :meth:`advance_to_next_deadline` move it holding that lock.

    ``record`` (a :class:`~dispatcher.Recorder`) records every intercept,
    its completion and what string I/O reads and writes in ``memory``, for
    :func:`~dispatcher.replay.replay`; closing the recorder is the caller's. What
    else moves the devices is recorded through it too
    (``clock.watch(record.timed(device))``, ``record.tap(line)``).
    """

    def __init__(
        self,
        router: Router,
        *,
        partition_id: int = 1,
        mode: CpuMode = CpuMode.LONG,
        strict: bool = True,
        deadline: float | None = None,
        dispatcher: Dispatcher | None = None,
        memory: GuestMemory | None = None,
        translate: Translate | None = identity_translation,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        clock: VirtualClock | None = None,
        record: Recorder | None = None,
    ) -> None:
        self.router = router
        self.partition_id = partition_id
        self.mode = mode
        self.strict = strict
        if dispatcher is None:
            seen = memory if memory is None or record is None else record.memory(memory)
            guest = None if seen is None else Guest(seen, translate, self._segment)
            dispatcher = Dispatcher(router, deadline=deadline, guest=guest, max_elements=max_elements, observer=record)
        elif memory is not None and (dispatcher.guest is None or memory is not dispatcher.guest.memory):
            raise ValueError("give the guest memory to the Dispatcher you pass")
        elif record is not None:
            raise ValueError("give the recorder to the Dispatcher you pass (observer=) and its guest (record.guest())")
        self.dispatcher = dispatcher
        if clock is None:
            clock = VirtualClock()
        if clock.lock is None:
            clock.lock = dispatcher.lock
        self.clock = clock
        if memory is None and dispatcher.guest is not None:
            memory = dispatcher.guest.memory
        self.memory = memory
        """The guest memory string I/O uses, as the test sees it."""
        self._vps: dict[int, FakeVP] = {}
        self._waiting: dict[int, tuple[anyio.Event, list[Completion]]] = {}
        self._transport: Transport | None = None
        self._task_group: anyio.abc.TaskGroup | None = None

    def vp(self, index: int = 0, *, mode: CpuMode | None = None) -> FakeVP:
        """The VP with this index (created on first use)."""
        vp = self._vps.get(index)
        if vp is None:
            vp = self._vps[index] = FakeVP(self, index, mode or self.mode)
        return vp

    def advance(self, ns: int) -> None:
        """Move ``clock`` ``ns`` nanoseconds on, running what falls due, holding the device lock."""
        with self.dispatcher.lock:
            self.clock.advance(ns)

    def advance_to(self, when_ns: int) -> None:
        """Move ``clock`` to ``when_ns``, running what falls due, holding the device lock."""
        with self.dispatcher.lock:
            self.clock.advance_to(when_ns)

    def advance_to_next_deadline(self) -> int | None:
        """Move ``clock`` to its next deadline (holding the device lock); return it, or None if nothing is due."""
        with self.dispatcher.lock:
            return self.clock.advance_to_next_deadline()

    def _segment(self, partition: int, vp_index: int, segment: Segment) -> SegmentRegister | None:
        vp = self._vps.get(vp_index)
        return vp.segment(segment) if vp is not None and partition == self.partition_id else None

    async def exchange(self, vp_index: int, frame: bytes) -> Completion:
        """Send one raw frame and wait for the completion addressed to ``vp_index``.

        Tests use it to send malformed frames; a frame whose VP cannot be read
        is answered to ``dispatcher.UNKNOWN_VP``.
        """
        if self._transport is None:
            raise RuntimeError("the partition is not running: use it with 'async with'")
        if vp_index in self._waiting:
            raise RuntimeError(f"VP {vp_index} already has an intercept in flight")
        event, slot = self._waiting[vp_index] = (anyio.Event(), [])
        try:
            await self._transport.send_batch([frame])
            await event.wait()
        finally:
            del self._waiting[vp_index]
        return slot[0]

    async def _receive_completions(self, transport: Transport) -> None:
        while frames := await transport.receive_batch():
            for frame in frames:
                completion = decode_completion(frame)
                waiter = self._waiting.get(completion.vp_index)
                if waiter is None:
                    raise DispatchError(f"completion for VP {completion.vp_index}, which has nothing in flight")
                waiter[1].append(completion)
                waiter[0].set()

    async def __aenter__(self) -> FakePartition:
        client, server = memory_transport_pair(max_batches=math.inf)
        self._transport = client
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        await self._task_group.start(self.dispatcher.serve, server)
        self._task_group.start_soon(self._receive_completions, client)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._task_group is not None and self._transport is not None
        self.dispatcher.stop()
        try:
            return await self._task_group.__aexit__(exc_type, exc, tb)
        finally:
            await self._transport.aclose()
            self._transport = None
