"""The lifecycle verbs: their frames (dispatcher.lifecycle), and RESET, PAUSE, RESUME, SAVE, RESTORE and
RELEASE answered by a real service process (a worker per VM) on a VMM's session connection."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from service_helpers import connect_raw

from dispatcher import FieldValueError
from dispatcher.hello import Capability
from dispatcher.lifecycle import (
    MAX_CHUNK,
    Assembler,
    LifecycleError,
    LifecycleReply,
    LifecycleRequest,
    LifecycleStatus,
    Verb,
    encode_reply,
    encode_request,
)
from dispatcher.wire import LIFECYCLE_HEAD, LIFECYCLE_REPLY, LIFECYCLE_REQUEST, Offset, message_type
from transports.service import connect_service
from transports.service.client import ServiceClient, io_intercept

pytestmark = pytest.mark.anyio

SCRATCH = 0x3FF


def intercept(port: int, *, vm: int, vp: int = 0, write: bool = False, value: int = 0) -> bytes:
    return io_intercept(port, 1, write=write, value=value, vp=vp, partition=vm)


# The frames.


@given(
    vm=st.integers(0, 2**64 - 1),
    verb=st.sampled_from(Verb),
    request_id=st.integers(0, 2**32 - 1),
    document=st.binary(max_size=3 * MAX_CHUNK + 5),
)
def test_a_request_spans_as_many_frames_as_its_document_needs_and_comes_back_whole(
    vm: int, verb: Verb, request_id: int, document: bytes
) -> None:
    frames = encode_request(LifecycleRequest(vm, verb, request_id, document))
    assert len(frames) == max(1, -(-len(document) // MAX_CHUNK))
    assert all(message_type(frame) == LIFECYCLE_REQUEST and len(frame) <= 256 for frame in frames)
    assembler = Assembler()
    *parts, last = [assembler.request(frame) for frame in frames]
    assert parts == [None] * len(parts)
    assert last == LifecycleRequest(vm, verb, request_id, document)


@given(status=st.sampled_from(LifecycleStatus), document=st.binary(max_size=2 * MAX_CHUNK + 1))
def test_a_reply_comes_back_whole(status: LifecycleStatus, document: bytes) -> None:
    frames = encode_reply(LifecycleReply(7, status, 9, document))
    assert all(message_type(frame) == LIFECYCLE_REPLY for frame in frames)
    assembler = Assembler()
    assert [assembler.reply(frame) for frame in frames][-1] == LifecycleReply(7, status, 9, document)


def _frame(verb: int = Verb.SAVE, *, flags: int = 1, offset: int = 0, version: int = 1, data: bytes = b"") -> bytes:
    head = LIFECYCLE_HEAD.pack(LIFECYCLE_REQUEST, 12 + len(data), 0, 0, 0, 3, version, verb, flags, 5, offset)
    return head + data


@pytest.mark.parametrize(
    ("frame", "field", "offset"),
    [
        (_frame(verb=9), "verb", Offset.LIFECYCLE_VERB),
        (_frame(version=2), "version", Offset.LIFECYCLE_VERSION),
        (_frame(flags=3), "flags", Offset.LIFECYCLE_FLAGS),
        (_frame(offset=10, data=b"x"), "offset", Offset.LIFECYCLE_OFFSET),
        (_frame()[:20], "payload", 20),
    ],
)
def test_a_malformed_request_frame_names_its_field_and_offset(frame: bytes, field: str, offset: int) -> None:
    with pytest.raises(FieldValueError if field != "payload" else Exception) as raised:
        Assembler().request(frame)
    assert getattr(raised.value, "field", None) == field
    assert getattr(raised.value, "offset", None) == offset


def test_a_document_past_the_limit_is_refused_naming_the_offset() -> None:
    assembler = Assembler(max_document=300)
    frames = encode_request(LifecycleRequest(3, Verb.RESTORE, 1, b"{" * 400))
    assert assembler.request(frames[0]) is None
    with pytest.raises(FieldValueError, match="passes the 300 bytes allowed") as raised:
        assembler.request(frames[1])
    assert raised.value.field == "offset"


# A real service.


async def test_the_service_answers_lifecycle_requests(socket_path: Path) -> None:
    async with connect_service(socket_path, vm=40) as client:
        assert client.reply is not None and client.reply.capabilities & Capability.LIFECYCLE
        await client.pause()
        await client.resume()


async def test_pause_holds_intercepts_back_in_order_until_resume(socket_path: Path) -> None:
    async with connect_service(socket_path, vm=41) as vmm, connect_service(socket_path, vm=41) as tool:
        await vmm.exchange(intercept(SCRATCH, vm=41, write=True, value=0x11))
        await tool.pause()
        done: list[int] = []
        async with anyio.create_task_group() as tg:

            async def write(vp: int, value: int) -> None:
                await vmm.exchange(intercept(SCRATCH, vm=41, vp=vp, write=True, value=value))
                done.append(vp)

            tg.start_soon(write, 1, 0x22)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(write, 2, 0x33)
            await anyio.wait_all_tasks_blocked()
            # A lifecycle request on the VMM's connection is read after both writes, and answered:
            # they have been read too, and are held.
            await vmm.pause()
            assert done == [] and vmm.in_flight == 2
            await tool.resume()
        assert sorted(done) == [1, 2]
        completion = await vmm.exchange(intercept(SCRATCH, vm=41))
        assert completion.rax & 0xFF == 0x33  # in the order they arrived


async def test_release_drops_the_devices_and_closes_the_vms_connections(socket_path: Path) -> None:
    async with connect_service(socket_path, vm=42) as first:
        await first.exchange(intercept(SCRATCH, vm=42, write=True, value=0x5A))
    async with connect_service(socket_path, vm=42) as again:
        assert (await again.exchange(intercept(SCRATCH, vm=42))).rax & 0xFF == 0x5A  # kept between connections
        other = await connect_raw(socket_path, vm=42)
        await again.release()
        with anyio.fail_after(10):
            while await other.receive_batch():
                pass  # the VM's other connection ends too
        await other.aclose()
    async with connect_service(socket_path, vm=42) as fresh:
        assert (await fresh.exchange(intercept(SCRATCH, vm=42))).rax & 0xFF == 0  # new devices


async def test_a_request_naming_another_vm_is_refused_naming_the_partition(socket_path: Path) -> None:
    transport = await connect_raw(socket_path, vm=43)
    try:
        await transport.send_batch(encode_request(LifecycleRequest(44, Verb.PAUSE, 77)))
        assembler = Assembler()
        reply = None
        with anyio.fail_after(10):
            while reply is None:
                for frame in await transport.receive_batch():
                    reply = assembler.reply(frame)
        assert (reply.status, reply.request_id) == (LifecycleStatus.BAD_REQUEST, 77)
        assert reply.message == "partition at offset 8 = 44: this connection is VM 43"
    finally:
        await transport.aclose()


async def test_an_unknown_verb_is_refused_and_the_connection_goes_on(socket_path: Path) -> None:
    transport = await connect_raw(socket_path, vm=45)
    try:
        bad = LIFECYCLE_HEAD.pack(LIFECYCLE_REQUEST, 12, 0, 0, 0, 45, 1, 99, 1, 8, 0)
        await transport.send_batch([bad, intercept(SCRATCH, vm=45, write=True, value=1)])
        kinds: list[int] = []
        reply = None
        with anyio.fail_after(10):
            while len(kinds) < 2:
                for frame in await transport.receive_batch():
                    kinds.append(message_type(frame))
                    if message_type(frame) == LIFECYCLE_REPLY:
                        reply = Assembler().reply(frame)
        assert reply is not None and (reply.status, reply.request_id) == (LifecycleStatus.UNKNOWN_VERB, 8)
        assert reply.message.startswith("verb at offset 17 = 0x63: not a verb this version defines (1 RESET, ")
    finally:
        await transport.aclose()


# Device state: SAVE, RESTORE and RESET on the example PC's devices.

device_state = pytest.importorskip("dispatcher.device_state", reason="the device state API is not built yet")


@pytest.fixture(scope="module", params=[(), ("--in-process",)], ids=["worker per VM", "in process"])
def pc_socket(anyio_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> object:
    from service_process import ServiceProcess

    tmp = tmp_path_factory.mktemp(f"pc-{anyio_backend}")
    mode: tuple[str, ...] = request.param
    process = ServiceProcess(tmp, "--deadline", "30", *mode, socket=tmp / "s.sock", backend=anyio_backend)
    yield process.socket
    assert process.stop() == 0, process.log


async def _cmos(client: ServiceClient, index: int, value: int | None = None) -> int:
    await client.exchange(intercept(0x70, vm=client.vm, write=True, value=index))
    if value is not None:
        await client.exchange(intercept(0x71, vm=client.vm, write=True, value=value))
    return (await client.exchange(intercept(0x71, vm=client.vm))).rax & 0xFF


async def test_save_then_restore_brings_back_a_register(pc_socket: Path) -> None:
    async with connect_service(pc_socket, vm=50) as client:
        assert await _cmos(client, 0x34, 0xAB) == 0xAB
        document = await client.save()
        assert document["format"] == "intercept-dispatch device state"
        json.dumps(document)  # plain JSON
        assert await _cmos(client, 0x34, 0x12) == 0x12
        await client.restore(document)
        assert await _cmos(client, 0x34) == 0xAB
        await client.exchange(intercept(0x3F9, vm=client.vm, write=True, value=0x05))  # COM1's IER
        assert (await client.exchange(intercept(0x3F9, vm=client.vm))).rax & 0xFF == 0x05
        await client.reset()
        assert (await client.exchange(intercept(0x3F9, vm=client.vm))).rax & 0xFF == 0  # its power-on value


def _corrupted(saved: dict[str, object], how: str) -> str:
    document = copy.deepcopy(saved)
    devices = document["devices"]
    assert isinstance(devices, dict)
    ident, entry = next(iter(devices.items()))
    if how == "another device":
        other = next(e for e in devices.values() if e["kind"] != entry["kind"])
        devices[ident] = other
    elif how == "newer version":
        entry["version"] = int(entry["version"]) + 1
    text = json.dumps(document)
    if how == "truncated":
        return text[: len(text) // 2]
    if how == "corrupted":
        return text.replace('"', "'", 3)
    return text


@pytest.mark.parametrize("how", ["another device", "newer version", "truncated", "corrupted"])
async def test_a_bad_restore_is_one_clear_error_and_leaves_the_vm_untouched(pc_socket: Path, how: str) -> None:
    async with connect_service(pc_socket, vm=51) as client:
        assert await _cmos(client, 0x35, 0x77) == 0x77
        document = await client.save()
        with pytest.raises(LifecycleError) as refused:
            await client.restore(_corrupted(document, how))
        assert refused.value.status == LifecycleStatus.STATE_ERROR
        message = str(refused.value)
        assert "\n" not in message and "Traceback" not in message
        assert "RESTORE" in message
        assert await _cmos(client, 0x35) == 0x77  # untouched


async def test_release_in_either_mode_starts_the_vm_again_from_reset(pc_socket: Path) -> None:
    async with connect_service(pc_socket, vm=52) as client:
        await client.exchange(intercept(0x3F9, vm=52, write=True, value=0x0F))
        await client.release()
    async with connect_service(pc_socket, vm=52) as client:
        assert (await client.exchange(intercept(0x3F9, vm=52))).rax & 0xFF == 0
