"""The intercept message codec, checked against frames built byte by byte at the seed's offsets."""

from __future__ import annotations

import contextlib
import ctypes
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher import (
    ANNOUNCEMENT,
    COMPLETION,
    Access,
    AccessInfo,
    AccessType,
    ExecutionState,
    FieldValueError,
    FrameError,
    IoPortInterceptMessage,
    PortRange,
    SegmentAttributes,
    SegmentRegister,
    ShortFrameError,
    UnknownMessageTypeError,
    decode_announcement,
    decode_completion,
    decode_message,
    encode_announcement,
)
from dispatcher.wire import CONTROL_REPLY, CONTROL_REQUEST
from transports.service.control import decode_reply, decode_request, encode_reply


def put(frame: bytearray, offset: int, size: int, value: int) -> None:
    frame[offset : offset + size] = value.to_bytes(size, "little")


def seed_frame(**overrides: int) -> bytearray:
    """A 144-byte intercept written field by field at the offsets of the seed page."""
    fields = {
        "type": 0x8001_0000,
        "payload": 128,
        "partition": 0x1122_3344_5566_7788,
        "vp": 7,
        "len_cr8": 0x52,
        "access": 1,
        "state": 0x0015,
        "cs_base": 0x1000,
        "cs_limit": 0xFFFF,
        "cs_sel": 0x08,
        "cs_attr": 0xA09B,
        "rip": 0xFFFF_8000_0000_1234,
        "rflags": 0x202,
        "port": 0x3F8,
        "info": 0x01,
        "count": 0,
        "rax": 0xDEAD_BEEF_CAFE_0041,
    }
    fields.update(overrides)
    f = bytearray(144)
    put(f, 0, 4, fields["type"])
    put(f, 4, 1, fields["payload"])
    put(f, 8, 8, fields["partition"])
    put(f, 16, 4, fields["vp"])
    put(f, 20, 1, fields["len_cr8"])
    put(f, 21, 1, fields["access"])
    put(f, 22, 2, fields["state"])
    put(f, 24, 8, fields["cs_base"])
    put(f, 32, 4, fields["cs_limit"])
    put(f, 36, 2, fields["cs_sel"])
    put(f, 38, 2, fields["cs_attr"])
    put(f, 40, 8, fields["rip"])
    put(f, 48, 8, fields["rflags"])
    put(f, 56, 2, fields["port"])
    put(f, 58, 1, fields["info"])
    put(f, 59, 1, fields["count"])
    put(f, 64, 8, fields["rax"])
    return f


def test_decodes_every_field_at_the_seed_offsets() -> None:
    f = seed_frame(info=0x1C, count=3, access=0)
    f[72:75] = b"\xf3\x66\x6d"
    put(f, 88, 8, 0x2000)  # DS base
    put(f, 96, 4, 0xFFFFF)
    put(f, 100, 2, 0x10)
    put(f, 102, 2, 0xC093)
    put(f, 104, 8, 0x3000)  # ES base
    put(f, 112, 4, 0xFFFF)
    put(f, 116, 2, 0x18)
    put(f, 118, 2, 0x0093)
    put(f, 120, 8, 5)
    put(f, 128, 8, 0x4000)
    put(f, 136, 8, 0x5000)
    m = decode_message(bytes(f))
    assert m.message_type == 0x8001_0000
    assert m.payload_size == 128
    assert m.message_flags == 0
    assert m.source_partition == 0x1122_3344_5566_7788
    assert m.vp_index == 7
    assert (m.instruction_length, m.cr8) == (2, 5)
    assert m.access_type is AccessType.READ
    assert m.execution_state == 0x15
    assert m.execution_state.cpl == 1 and m.execution_state.cr0_pe and m.execution_state.efer_lma
    assert not m.execution_state.cr0_am
    assert m.cs_segment == SegmentRegister(0x1000, 0xFFFF, 0x08, SegmentAttributes(0xA09B))
    assert m.cs_segment.attributes.long and m.cs_segment.attributes.present and m.cs_segment.attributes.granularity
    assert m.cs_segment.attributes.type == 0xB and m.cs_segment.attributes.s
    assert not m.cs_segment.attributes.default_big
    assert m.rip == 0xFFFF_8000_0000_1234
    assert m.rflags == 0x202
    assert m.port_number == 0x3F8
    assert m.access_info.access_size == 4 and m.access_info.string_op and m.access_info.rep_prefix
    assert m.instruction_byte_count == 3
    assert m.instruction_bytes[:3] == b"\xf3\x66\x6d"
    assert m.rax == 0xDEAD_BEEF_CAFE_0041
    assert m.ds_segment == SegmentRegister(0x2000, 0xFFFFF, 0x10, SegmentAttributes(0xC093))
    assert m.ds_segment.attributes.default_big
    assert m.es_segment == SegmentRegister(0x3000, 0xFFFF, 0x18, SegmentAttributes(0x0093))
    assert (m.rcx, m.rsi, m.rdi) == (5, 0x4000, 0x5000)


def test_round_trip_is_byte_exact() -> None:
    f = bytes(seed_frame())
    assert decode_message(f).to_bytes() == f


def test_builds_from_fields_into_the_same_bytes() -> None:
    m = IoPortInterceptMessage(
        port_number=0x3F8,
        access_type=AccessType.WRITE,
        access_info=AccessInfo.build(1),
        rax=0xDEAD_BEEF_CAFE_0041,
        vp_index=7,
        source_partition=0x1122_3344_5566_7788,
        instruction_length=2,
        cr8=5,
        execution_state=ExecutionState.build(cpl=1, cr0_pe=True, efer_lma=True),
        cs_segment=SegmentRegister(
            0x1000, 0xFFFF, 0x08, SegmentAttributes.build(type=0xB, s=True, present=True, long=True, granularity=True)
        ),
        rip=0xFFFF_8000_0000_1234,
        rflags=0x202,
        ds_segment=SegmentRegister(0, 0, 0, SegmentAttributes(0)),
        es_segment=SegmentRegister(0, 0, 0, SegmentAttributes(0)),
    )
    assert m.to_bytes() == bytes(seed_frame())


def test_reads_the_header_as_the_seed_page_draws_it() -> None:
    f = seed_frame()
    f[4:8] = b"\x00\x00\x00\x80"  # PayloadSize 128 at byte 7, bytes 4-6 zero
    m = decode_message(bytes(f))
    assert m.payload_size == 128
    assert m.to_bytes() == bytes(seed_frame())  # written back in the ABI layout


def test_accepts_a_whole_message_slot() -> None:
    f = bytes(seed_frame()) + bytes(112)
    assert len(f) == 256
    assert decode_message(f).port_number == 0x3F8


def test_accepts_a_longer_payload_and_ignores_its_tail() -> None:
    f = seed_frame(payload=200) + b"\x55" * 72
    m = decode_message(bytes(f))
    assert m.payload_size == 200
    assert len(m.to_bytes()) == 216


@pytest.mark.parametrize(
    ("frame", "error", "field", "offset", "value"),
    [
        (bytes(10), ShortFrameError, "message_header", 10, None),
        (bytes(seed_frame())[:100], ShortFrameError, "payload", 100, None),
        (bytes(seed_frame(type=0x8001_0001)), UnknownMessageTypeError, "message_type", 0, 0x8001_0001),
        (bytes(seed_frame(payload=127)), FieldValueError, "payload_size", 4, 127),
        (bytes(seed_frame(payload=241)) + bytes(200), FieldValueError, "payload_size", 4, 241),
        (bytes(seed_frame()) + bytes(113), FieldValueError, "frame_length", 256, 257),
        (bytes(seed_frame(info=3)), FieldValueError, "access_info.access_size", 58, 3),
        (bytes(seed_frame(info=0)), FieldValueError, "access_info.access_size", 58, 0),
        (bytes(seed_frame(access=2)), FieldValueError, "access_type", 21, 2),
        (bytes(seed_frame(info=0x11)), FieldValueError, "access_info.rep_prefix", 58, 0x11),
        (bytes(seed_frame(info=0x09, count=17)), FieldValueError, "instruction_byte_count", 59, 17),
    ],
)
def test_bad_frames_name_field_offset_and_value(
    frame: bytes, error: type[FrameError], field: str, offset: int, value: int | None
) -> None:
    with pytest.raises(error) as caught:
        decode_message(frame)
    assert (caught.value.field, caught.value.offset, caught.value.value) == (field, offset, value)
    assert field in str(caught.value) and str(offset) in str(caught.value)


def test_reserved_bits_are_ignored_and_preserved() -> None:
    f = seed_frame(info=0xE1, state=0xC015)
    f[6:8] = b"\x12\x00"
    f[60:64] = b"\xaa\xbb\xcc\xdd"
    m = decode_message(bytes(f))
    assert m.access_info.access_size == 1 and not m.access_info.string_op
    assert m.to_bytes() == bytes(f)


class _Segment(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("attributes", ctypes.c_uint16),
    ]


class _Message(ctypes.LittleEndianStructure):
    """The ABI layout as the Linux headers spell it: the oracle for offsets."""

    _pack_ = 1
    _fields_ = [
        ("message_type", ctypes.c_uint32),
        ("payload_size", ctypes.c_uint8),
        ("message_flags", ctypes.c_uint8),
        ("reserved", ctypes.c_uint16),
        ("sender", ctypes.c_uint64),
        ("vp_index", ctypes.c_uint32),
        ("instruction_length_cr8", ctypes.c_uint8),
        ("intercept_access_type", ctypes.c_uint8),
        ("execution_state", ctypes.c_uint16),
        ("cs_segment", _Segment),
        ("rip", ctypes.c_uint64),
        ("rflags", ctypes.c_uint64),
        ("port_number", ctypes.c_uint16),
        ("access_info", ctypes.c_uint8),
        ("instruction_byte_count", ctypes.c_uint8),
        ("reserved2", ctypes.c_uint32),
        ("rax", ctypes.c_uint64),
        ("instruction_bytes", ctypes.c_uint8 * 16),
        ("ds_segment", _Segment),
        ("es_segment", _Segment),
        ("rcx", ctypes.c_uint64),
        ("rsi", ctypes.c_uint64),
        ("rdi", ctypes.c_uint64),
    ]


def test_layout_matches_the_ctypes_oracle() -> None:
    assert ctypes.sizeof(_Message) == 144
    m = IoPortInterceptMessage(
        port_number=0x1F0,
        rax=0x1234,
        rcx=9,
        rsi=0x10,
        rdi=0x20,
        vp_index=3,
        rip=0x7C00,
        instruction_bytes=b"\xf3\x6d",
        access_info=AccessInfo.build(2, string_op=True, rep_prefix=True),
        es_segment=SegmentRegister(0x5000, 0xFFFF, 0x500, SegmentAttributes(0x93)),
    )
    c = _Message.from_buffer_copy(m.to_bytes())
    assert (c.port_number, c.rax, c.rcx, c.rsi, c.rdi, c.vp_index, c.rip) == (0x1F0, 0x1234, 9, 0x10, 0x20, 3, 0x7C00)
    assert c.access_info == 0x1A and c.instruction_byte_count == 2
    assert bytes(c.instruction_bytes[:2]) == b"\xf3\x6d"
    assert (c.es_segment.base, c.es_segment.selector, c.es_segment.attributes) == (0x5000, 0x500, 0x93)
    assert _Message.rax.offset == 64 and _Message.rdi.offset == 136 and _Message.es_segment.offset == 104


u8, u16, u32, u64 = (st.integers(0, 2**n - 1) for n in (8, 16, 32, 64))
segments = st.builds(SegmentRegister, u64, u32, u16, u16.map(SegmentAttributes))


@st.composite
def messages(draw: st.DrawFn) -> IoPortInterceptMessage:
    string_op = draw(st.booleans())
    return IoPortInterceptMessage(
        port_number=draw(u16),
        access_type=draw(st.sampled_from(AccessType).filter(lambda a: a != AccessType.EXECUTE)),
        access_info=AccessInfo.build(
            draw(st.sampled_from([1, 2, 4])), string_op=string_op, rep_prefix=string_op and draw(st.booleans())
        ),
        rax=draw(u64),
        vp_index=draw(u32),
        source_partition=draw(u64),
        instruction_length=draw(st.integers(0, 15)),
        cr8=draw(st.integers(0, 15)),
        execution_state=ExecutionState(draw(u16)),
        cs_segment=draw(segments),
        rip=draw(u64),
        rflags=draw(u64),
        instruction_bytes=draw(st.binary(max_size=16)),
        ds_segment=draw(segments),
        es_segment=draw(segments),
        rcx=draw(u64),
        rsi=draw(u64),
        rdi=draw(u64),
        message_flags=draw(u8),
        reserved_header=draw(u16.filter(lambda v: v != 0)) if draw(st.booleans()) else 0,
        reserved_payload=draw(u32),
    )


@given(messages())
def test_encode_decode_round_trip(message: IoPortInterceptMessage) -> None:
    data = message.to_bytes()
    assert len(data) == 144
    assert decode_message(data) == message
    assert decode_message(data).to_bytes() == data


@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_frame_errors(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        decode_message(data)


@given(st.binary(min_size=144, max_size=144))
def test_arbitrary_payloads_under_a_valid_header_decode_or_raise_frame_errors(tail: bytes) -> None:
    data = struct.pack("<IB", 0x8001_0000, 128) + tail[5:]
    try:
        message = decode_message(data)
    except FrameError:
        return
    assert message.to_bytes()[16:] == data[16:]


# The other decoders of frames a peer sends: a short or arbitrary frame is a FrameError naming the field.


@pytest.mark.parametrize("size", range(8))
def test_an_announcement_with_a_short_payload_names_payload_size(size: int) -> None:
    frame = struct.pack("<IBBHQ", ANNOUNCEMENT, size, 0, 0, 0) + bytes(size)
    with pytest.raises(FieldValueError) as caught:
        decode_announcement(frame)
    assert (caught.value.field, caught.value.offset, caught.value.value) == ("payload_size", 4, size)


def test_an_announcement_cut_short_names_the_missing_payload() -> None:
    frame = encode_announcement([PortRange(1, 2, Access.READ)])[0]
    with pytest.raises(ShortFrameError) as caught:
        decode_announcement(frame[:20])
    assert (caught.value.field, caught.value.offset) == ("payload", 20)


def test_an_announcement_whose_count_outruns_its_payload_names_entry_count() -> None:
    frame = bytearray(encode_announcement([PortRange(1, 2, Access.READ)])[0])
    frame[18] = 2
    with pytest.raises(FieldValueError) as caught:
        decode_announcement(bytes(frame))
    assert (caught.value.field, caught.value.offset, caught.value.value) == ("entry_count", 18, 2)


@pytest.mark.parametrize(
    ("change", "field", "offset", "value"),
    [((16, 2), "version", 16, 2), ((18, 9), "status", 18, 9)],
)
def test_a_control_reply_names_a_bad_version_or_status(
    change: tuple[int, int], field: str, offset: int, value: int
) -> None:
    frame = bytearray(encode_reply(b"{}")[0])
    frame[change[0]] = change[1]
    with pytest.raises(FieldValueError) as caught:
        decode_reply(bytes(frame))
    assert (caught.value.field, caught.value.offset, caught.value.value) == (field, offset, value)


DECODERS = (decode_announcement, decode_completion, decode_reply, decode_request)


@given(st.binary(max_size=300))
def test_every_decoder_raises_only_frame_errors_on_arbitrary_bytes(data: bytes) -> None:
    for decode in DECODERS:
        with contextlib.suppress(FrameError):
            decode(data)


@given(
    st.sampled_from([ANNOUNCEMENT, COMPLETION, CONTROL_REQUEST, CONTROL_REPLY]),
    st.integers(0, 255),
    st.binary(max_size=260),
)
def test_every_decoder_raises_only_frame_errors_under_its_own_message_type(kind: int, size: int, tail: bytes) -> None:
    data = struct.pack("<IB", kind, size) + tail
    for decode in DECODERS:
        with contextlib.suppress(FrameError):
            decode(data)
