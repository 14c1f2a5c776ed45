"""Traces for the replay tests, recorded from an engine the way a dispatcher records them (the Recorder API)."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

from dispatcher import (
    AccessInfo,
    AccessType,
    BufferMemory,
    Engine,
    ExecutionState,
    Guest,
    IoPortInterceptMessage,
    IrqLine,
    Router,
    SegmentAttributes,
    SegmentRegister,
    encode_io_instruction,
    identity_translation,
)
from dispatcher.clock import VirtualClock
from dispatcher.recorder import Recorder
from dispatcher.trace import TraceReader, TraceWriter, new_metadata
from dispatcher.trace_records import TraceEvent
from transports.service.client import io_intercept

FLAT_DATA = SegmentRegister(0, 0xFFFF_FFFF, 0x10, SegmentAttributes(0xC093))
FLAT_CODE = SegmentRegister(0, 0xFFFF_FFFF, 0x08, SegmentAttributes(0xC09B))


def port_frame(port: int, size: int = 1, write: bool = False, value: int = 0, vp: int = 0) -> bytes:
    """An IN or OUT intercept frame."""
    return io_intercept(port, size, write=write, value=value, vp=vp)


def string_frame(port: int, *, outs: bool, count: int, address: int) -> bytes:
    """A 32-bit REP OUTSB (from ``address``) or REP INSB (to ``address``) of ``count`` bytes."""
    code = encode_io_instruction(write=outs, size=1, bits=32, string=True, rep=True)
    return IoPortInterceptMessage(
        port_number=port,
        access_type=AccessType.WRITE if outs else AccessType.READ,
        access_info=AccessInfo.build(1, string_op=True, rep_prefix=True),
        instruction_length=len(code),
        instruction_bytes=code,
        execution_state=ExecutionState.build(cr0_pe=True),
        cs_segment=FLAT_CODE,
        rip=0x1000,
        ds_segment=FLAT_DATA,
        es_segment=FLAT_DATA,
        rcx=count,
        rsi=address if outs else 0,
        rdi=0 if outs else address,
    ).to_bytes()


@dataclass(frozen=True)
class Advance:
    """Move the clock to ``when_ns`` and poll the machine (a ClockAdvance)."""

    when_ns: int


@dataclass(frozen=True)
class Ack:
    """Run the machine's interrupt acknowledge cycle (an Acknowledge)."""


def record(
    machine: object,
    steps: Iterable[bytes | Advance | Ack],
    *,
    clock: VirtualClock | None = None,
    memory: BufferMemory | None = None,
    taps: Iterable[IrqLine] = (),
    step_ns: int = 1000,
) -> list[TraceEvent]:
    """Run ``steps`` on ``machine`` (a Router or an object with one) and return the trace recorded.

    Each frame arrives ``step_ns`` after the one before (the clock follows);
    ``taps`` are the interrupt lines whose edges are recorded.
    """
    router = machine if isinstance(machine, Router) else machine.router  # type: ignore[attr-defined]
    stream = io.BytesIO()
    writer = TraceWriter(stream, new_metadata("api"))
    recorder = Recorder(writer, clock=clock)
    for line in taps:
        recorder.tap(line)
    guest = recorder.guest(Guest(memory, identity_translation)) if memory is not None else None
    engine = Engine(router, deadline=None, observer=recorder, guest=guest)
    now = 0
    for step in steps:
        if isinstance(step, Advance):
            assert clock is not None
            clock.advance_to(step.when_ns)
            now = step.when_ns
            recorder.clock_advanced()
            getattr(machine, "poll", lambda: None)()
        elif isinstance(step, Ack):
            pic = machine.pic  # type: ignore[attr-defined]
            recorder.acknowledged(None if pic.pending_vector() is None else pic.acknowledge())
        else:
            now += step_ns
            if clock is not None:
                clock.advance_to(now)
            _, jobs = engine.receive([step])
            assert not jobs
    writer.flush()
    return TraceReader(stream.getvalue()).read().events
