"""Every intercept a real vCPU produces describes the instruction that caused it.

The frames of whole guest runs are recorded on their way to the dispatcher
and checked against guest memory: at CS:RIP there is an I/O instruction of
InstructionLength bytes, with the frame's direction, width, port (imm8
forms), StringOp and REP; string frames carry those bytes; simple ones carry
zeros past RAX, as the seed says.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from kvm_machine import run_guest
from kvm_support import requires_kvm

from dispatcher import AccessType, Guest, IoPortInterceptMessage, Transport, decode_message
from dispatcher.x86 import code_size, decode_io_instruction
from examples.guests import guest_bytes
from transports.kvm import KvmTransport, boot_flat_image

pytestmark = [requires_kvm, pytest.mark.anyio]


class Recorder(Transport):
    def __init__(self, inner: KvmTransport) -> None:
        self.inner = inner
        self.messages: list[IoPortInterceptMessage] = []

    @property
    def guest(self) -> Guest:
        return self.inner.guest  # the same connection: the same guest memory

    async def receive_batch(self) -> list[bytes]:
        frames = await self.inner.receive_batch()
        self.messages.extend(decode_message(frame) for frame in frames)
        return frames

    async def send_batch(self, frames: Sequence[bytes]) -> None:
        await self.inner.send_batch(frames)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("name", ["hello_real", "io_prot32", "io_long64", "rep_ins"])
async def test_frames_describe_the_instructions_in_guest_memory(name: str) -> None:
    recorders: list[Recorder] = []

    def record(transport: KvmTransport) -> Transport:
        recorders.append(Recorder(transport))
        return recorders[0]

    vm, _ = boot_flat_image(guest_bytes(name), ram_size=0x20000 if name == "rep_ins" else 0x200000)
    with vm:
        await run_guest(vm, wrap=record)
        messages = recorders[0].messages
        assert len(messages) >= 10
        kinds = set()
        for message in messages:
            state, cs = message.execution_state, message.cs_segment
            bits = code_size(state, cs.attributes)
            mask = (1 << 64) - 1 if bits == 64 else 0xFFFF_FFFF
            # The guests' code is identity-mapped: linear is guest-physical.
            code = vm.read_memory((cs.base + message.rip) & mask, 16)
            insn = decode_io_instruction(code, bits)
            where = f"{name}: {message.access_type.name} port {message.port_number:#x} at RIP {message.rip:#x}"
            assert insn.length == message.instruction_length, where
            assert insn.is_write == (message.access_type is AccessType.WRITE), where
            assert insn.size == message.access_info.access_size, where
            assert insn.string == message.access_info.string_op and insn.rep == message.access_info.rep_prefix
            if insn.port is not None:
                assert insn.port == message.port_number, where
            assert message.vp_index == 0 and message.source_partition == 0
            if insn.string:
                count = message.instruction_byte_count or 0
                assert count >= insn.length and message.instruction_bytes[:count] == code[:count], where
            else:
                assert message.instruction_byte_count == 0 and (message.rcx, message.rsi, message.rdi) == (0, 0, 0)
            kinds.add((insn.is_write, insn.string))
            if name != "hello_real" and message.rip > 0x7D00:
                assert state.cr0_pe  # past the mode switch
            if name == "io_long64" and bits == 64:
                assert state.efer_lma
    expected = {"hello_real": {(False, False), (True, False)}, "rep_ins": {(False, True), (True, False)}}
    assert kinds >= expected.get(name, {(False, False), (True, False), (False, True), (True, True)})
