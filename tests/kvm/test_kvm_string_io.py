"""KVM's batched string exits give the guest what the dispatcher's string I/O path gives a fake VP.

examples/guests/rep_ins.asm runs six REP INS cases under KVM (where KVM
reports up to 1024 elements per exit, never across a page, and stores them
itself); the same cases run on a FakeVP, whose intercepts the dispatcher
completes against its own guest memory. Guest memory must come out the same,
byte for byte, with per-element handlers and with a bulk handler.
"""

from __future__ import annotations

import pytest
from kvm_machine import run_guest
from kvm_support import requires_kvm

from dispatcher import (
    BufferMemory,
    BulkAccess,
    PortAccess,
    Router,
    SegmentAttributes,
    SegmentRegister,
    on_bulk,
    on_port,
)
from examples.guests import guest_bytes
from transports.kvm import StopReason, boot_flat_image
from transports.testing import CpuMode, FakePartition

pytestmark = [requires_kvm, pytest.mark.anyio]

PORT = 0xE8
COMPARED = range(0x1000, 0x7200)  # every byte the cases write, and the untouched bytes between them
RAM = 0x20000


class Sequence:
    """Port 0xE8: every read answers the next value of a fixed pseudo-random sequence."""

    io_base = PORT

    def __init__(self) -> None:
        self.state = 0x1234_5678
        self.reads = 0

    def next(self, size: int) -> int:
        self.state = (self.state * 1_103_515_245 + 12_345) & 0xFFFF_FFFF
        self.reads += 1
        return (self.state >> 3) & ((1 << 8 * size) - 1)

    @on_port(0, 1, access="r")
    def port(self, access: PortAccess) -> int:
        return self.next(access.size)


class BulkSequence(Sequence):
    """The same sequence, a whole chunk per call."""

    @on_bulk(0, 1, access="r")
    def chunk(self, access: BulkAccess) -> bytes:
        return b"".join(self.next(access.size).to_bytes(access.size, "little") for _ in range(access.elements))


async def on_fake_vp(device: Sequence) -> bytes:
    memory = BufferMemory([(0, bytearray(RAM))])
    router = Router()
    router.include(device)
    async with FakePartition(router, mode=CpuMode.REAL, memory=memory) as partition:
        vp = partition.vp(0)
        flat = vp.es
        for df, es, di, cx, size, rep in [
            (0, flat, 0x1000, 0x0300, 2, True),
            (1, flat, 0x3FFE, 0x0181, 2, True),
            (0, flat, 0x4F80, 0x1100, 1, True),
            (0, SegmentRegister(0x6000, 0xFFFF, 0x0600, SegmentAttributes(0x93)), 0x0010, 5, 4, True),
            (0, flat, 0x7000, 0, 2, True),
            (0, flat, 0x7100, 0, 2, False),
        ]:
            vp.rflags = 0x2 | df << 10
            vp.es, vp.rdi, vp.rcx = es, di, cx
            await vp.string(PORT, size, write=False, rep=rep)
    return memory.read(COMPARED.start, len(COMPARED))


@pytest.mark.parametrize("device_type", [Sequence, BulkSequence], ids=["per-element", "bulk"])
async def test_rep_ins_under_kvm_matches_the_fake_vp(device_type: type[Sequence]) -> None:
    vm, _ = boot_flat_image(guest_bytes("rep_ins"), ram_size=RAM)
    with vm:
        under_kvm = device_type()
        run = await run_guest(vm, devices=[under_kvm])
        assert run.status == 0 and run.reasons == [StopReason.STOPPED]
        kvm_memory = vm.read_memory(COMPARED.start, len(COMPARED))
    fake = device_type()
    fake_memory = await on_fake_vp(fake)
    assert under_kvm.reads == fake.reads == 0x300 + 0x181 + 0x1100 + 5 + 1
    assert kvm_memory == fake_memory
    assert kvm_memory != bytes(len(COMPARED))  # the cases did write something
