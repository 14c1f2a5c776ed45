"""Drive the sans-I/O engine with string instructions as a VMM would: re-execute until RIP moves."""

from __future__ import annotations

from dataclasses import dataclass, field

from dispatcher import (
    AccessInfo,
    AccessType,
    Completion,
    Engine,
    ExecutionState,
    IoPortInterceptMessage,
    Registers,
    Segment,
    SegmentAttributes,
    SegmentRegister,
    Status,
    decode_completion,
    encode_io_instruction,
)

MODES = {
    # mode: (execution state, CS attributes, default operand bytes, default address bits)
    "real": (ExecutionState.build(), SegmentAttributes(0x009B), 2, 16),
    "protected": (ExecutionState.build(cr0_pe=True), SegmentAttributes(0xC09B), 4, 32),
    "long": (ExecutionState.build(cr0_pe=True, efer_lma=True), SegmentAttributes(0xA09B), 4, 64),
}
FLAT_DATA = SegmentRegister(0, 0xFFFF_FFFF, 0x10, SegmentAttributes(0xC093))


def instruction(mode: str, *, outs: bool, size: int, rep: bool, address_size: int, segment: str | None) -> bytes:
    """INS or OUTS in ``mode``, from the public encoder (tests/test_x86.py checks it byte by byte)."""
    return encode_io_instruction(
        write=outs,
        size=size,
        bits=MODES[mode][3],
        string=True,
        rep=rep,
        address_size=address_size,
        override=None if segment is None else Segment[segment.upper()],
    )


@dataclass
class Vp:
    """The registers a string instruction reads and the completions write."""

    mode: str
    rcx: int = 0
    rsi: int = 0
    rdi: int = 0
    rip: int = 0x1000
    rflags: int = 0x2
    cs: SegmentRegister | None = None
    ds: SegmentRegister = FLAT_DATA
    es: SegmentRegister = FLAT_DATA
    execution_state: ExecutionState | None = None
    history: list[tuple[int, Completion]] = field(default_factory=list)  # (RCX before, completion)

    def message(self, port: int, code: bytes, *, outs: bool, size: int, rep: bool) -> IoPortInterceptMessage:
        state, cs_attributes, _, _ = MODES[self.mode]
        cs = self.cs or SegmentRegister(0, 0xFFFF if self.mode == "real" else 0xFFFF_FFFF, 8, cs_attributes)
        return IoPortInterceptMessage(
            port_number=port,
            access_type=AccessType.WRITE if outs else AccessType.READ,
            access_info=AccessInfo.build(size, string_op=True, rep_prefix=rep),
            instruction_length=len(code),
            instruction_bytes=code,
            execution_state=state if self.execution_state is None else self.execution_state,
            cs_segment=cs,
            rip=self.rip,
            rflags=self.rflags,
            ds_segment=self.ds,
            es_segment=self.es,
            rcx=self.rcx,
            rsi=self.rsi,
            rdi=self.rdi,
        )

    def apply(self, completion: Completion) -> None:
        self.history.append((self.rcx, completion))
        for flag, name in ((Registers.RIP, "rip"), (Registers.RCX, "rcx"), (Registers.RSI, "rsi"),
                           (Registers.RDI, "rdi")):  # fmt: skip
            if completion.registers & flag:
                setattr(self, name, getattr(completion, name))


def run(
    engine: Engine,
    vp: Vp,
    port: int,
    *,
    outs: bool,
    size: int,
    rep: bool,
    address_size: int | None = None,
    segment: str | None = None,
) -> Completion:
    """Execute one instruction to its end (RIP moved) or to a completion that makes no progress."""
    code = instruction(vp.mode, outs=outs, size=size, rep=rep,
                       address_size=address_size or MODES[vp.mode][3], segment=segment)  # fmt: skip
    for _ in range(1 << 20):
        out, jobs = engine.receive([vp.message(port, code, outs=outs, size=size, rep=rep).to_bytes()])
        assert not jobs and len(out) == 1
        completion = decode_completion(out[0])
        vp.apply(completion)
        if completion.registers & Registers.RIP or not completion.registers & Registers.RCX:
            return completion
        assert completion.status is Status.COMPLETED
    raise AssertionError("the instruction never finished")
