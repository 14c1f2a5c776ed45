"""Test a device model the way a guest would use it: a fake VMM in process.

:class:`FakePartition` runs a real :class:`~dispatcher.Dispatcher` over the
in-memory transport; its :class:`FakeVP` objects build real intercept frames
with realistic register state, send them, and apply each completion to their
own RAX and RIP::

    async with FakePartition(router) as partition:
        vp = partition.vp(0)
        await vp.outb(0x3F8, 0x41)
        assert await vp.inb(0x3FD) & 0x20

With the package installed, pytest gets the fixtures ``fake_partition`` and
``fake_vp``, built from a ``router`` fixture that the test module supplies.
"""

from __future__ import annotations

import enum
import math
from types import TracebackType

import anyio

from dispatcher import (
    AccessInfo,
    AccessType,
    Completion,
    Dispatcher,
    DispatchError,
    ExecutionState,
    IoPortInterceptMessage,
    Registers,
    Router,
    SegmentAttributes,
    SegmentRegister,
    Status,
    Transport,
    decode_completion,
)

from .memory import memory_transport_pair

__all__ = ["CompletionError", "CpuMode", "FakePartition", "FakeVP"]


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


class CompletionError(DispatchError):
    """A completion came back with a status other than COMPLETED."""

    def __init__(self, completion: Completion) -> None:
        super().__init__(
            f"VP {completion.vp_index}: port {completion.port_number:#x} completed with "
            f"{completion.status.name} (detail {completion.detail:#x})"
        )
        self.completion = completion


class FakeVP:
    """A virtual processor that executes IN and OUT as guest code would.

    Registers live in attributes (``rax``, ``rip``, ``rflags``); each access
    sends an intercept carrying them and applies the completion. With
    ``strict`` (the partition's default) a completion that is not COMPLETED
    raises :class:`CompletionError` after it has been applied.
    """

    def __init__(self, partition: FakePartition, index: int, mode: CpuMode) -> None:
        self.partition = partition
        self.index = index
        self.mode = mode
        self.execution_state, self.cs_attributes, self.rip = _MODE_STATE[mode]
        self.rax = 0
        self.rflags = 0x2
        self.last_completion: Completion | None = None
        self._lock = anyio.Lock()

    def _instruction_length(self, port: int, size: int) -> int:
        # IN/OUT with an imm8 port is two bytes, with DX one; an operand size
        # other than the mode's default adds the 0x66 prefix.
        length = 2 if port <= 0xFF else 1
        default_operand = 2 if self.mode is CpuMode.REAL else 4
        if size > 1 and size != default_operand:
            length += 1
        return length

    async def access(self, port: int, size: int, *, write: bool) -> Completion:
        """Execute one IN (``write=False``) or OUT of ``size`` bytes using the current RAX."""
        message = IoPortInterceptMessage(
            port_number=port,
            access_type=AccessType.WRITE if write else AccessType.READ,
            access_info=AccessInfo.build(size),
            rax=self.rax,
            vp_index=self.index,
            source_partition=self.partition.partition_id,
            instruction_length=self._instruction_length(port, size),
            execution_state=self.execution_state,
            cs_segment=SegmentRegister(0, 0xFFFF_FFFF if self.mode is not CpuMode.REAL else 0xFFFF,
                                       0x8 if self.mode is not CpuMode.REAL else 0, self.cs_attributes),
            rip=self.rip,
            rflags=self.rflags,
        )
        async with self._lock:
            completion = await self.partition.exchange(self.index, message.to_bytes())
        self.apply(completion)
        if self.partition.strict and completion.status is not Status.COMPLETED:
            raise CompletionError(completion)
        return completion

    def apply(self, completion: Completion) -> None:
        """Set the registers the completion names, as a VMM would."""
        self.last_completion = completion
        if completion.registers & Registers.RIP:
            self.rip = completion.rip
        if completion.registers & Registers.RAX:
            self.rax = completion.rax

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


class FakePartition:
    """A partition of fake VPs wired to a real Dispatcher over the in-memory transport.

    Use it as an async context manager; leaving it stops the dispatcher
    gracefully. ``dispatcher`` may be given to inspect its statistics. There
    is no handler deadline unless one is given: a test's outcome must not
    depend on how busy the machine is.
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
    ) -> None:
        self.router = router
        self.partition_id = partition_id
        self.mode = mode
        self.strict = strict
        self.dispatcher = dispatcher if dispatcher is not None else Dispatcher(router, deadline=deadline)
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

