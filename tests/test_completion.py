"""The completion and port announcement frames, checked at the offsets of docs/PROTOCOL.md."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher import (
    Access,
    Completion,
    FieldValueError,
    FrameError,
    PortRange,
    Registers,
    ShortFrameError,
    Status,
    UnknownMessageTypeError,
    decode_announcement,
    decode_completion,
    encode_announcement,
)


def test_completion_layout() -> None:
    data = Completion(
        vp_index=5,
        status=Status.HANDLER_FAILED,
        registers=Registers.RIP | Registers.RAX,
        rip=0x1122,
        rax=0x33FF,
        rcx=1,
        rsi=2,
        rdi=3,
        source_partition=9,
        port_number=0x64,
        access_info=1,
        detail=0xABCD,
    ).to_bytes()
    assert len(data) == 72
    le = int.from_bytes
    assert le(data[0:4], "little") == 0x1D00_0001 and data[4] == 56
    assert le(data[8:16], "little") == 9 and le(data[16:20], "little") == 5
    assert (data[20], data[21], le(data[22:24], "little")) == (1, 1, 3)
    assert [le(data[o : o + 8], "little") for o in (24, 32, 40, 48, 56)] == [0x1122, 0x33FF, 1, 2, 3]
    assert (le(data[64:66], "little"), data[66], le(data[68:72], "little")) == (0x64, 1, 0xABCD)


@given(
    st.builds(
        Completion,
        vp_index=st.integers(0, 2**32 - 1),
        status=st.sampled_from(Status),
        registers=st.integers(0, 31).map(Registers),
        rip=st.integers(0, 2**64 - 1),
        rax=st.integers(0, 2**64 - 1),
        rcx=st.integers(0, 2**64 - 1),
        rsi=st.integers(0, 2**64 - 1),
        rdi=st.integers(0, 2**64 - 1),
        access_info=st.integers(0, 255),
        version=st.just(1),
        source_partition=st.integers(0, 2**64 - 1),
        port_number=st.integers(0, 0xFFFF),
        detail=st.integers(0, 2**32 - 1),
    )
)
def test_completion_round_trip(completion: Completion) -> None:
    assert decode_completion(completion.to_bytes()) == completion


@pytest.mark.parametrize(
    ("data", "error", "field"),
    [
        (Completion(0).to_bytes()[:40], ShortFrameError, "payload"),
        (b"\x00\x00\x01\x80" + Completion(0).to_bytes()[4:], UnknownMessageTypeError, "message_type"),
        (Completion(0, version=2).to_bytes(), FieldValueError, "version"),
        (Completion(0).to_bytes()[:21] + b"\x7f" + Completion(0).to_bytes()[22:], FieldValueError, "status"),
    ],
)
def test_bad_completions_are_named(data: bytes, error: type[FrameError], field: str) -> None:
    with pytest.raises(error) as caught:
        decode_completion(data)
    assert caught.value.field == field


def test_announcement_spans_frames_and_marks_the_last() -> None:
    ranges = [PortRange(p, p + 1, Access(1 + p % 3)) for p in range(0, 400, 4)]
    frames = encode_announcement(ranges)
    assert len(frames) == 4 and all(len(f) <= 256 for f in frames)
    decoded: list[PortRange] = []
    finals = []
    for frame in frames:
        part, final = decode_announcement(frame)
        decoded += part
        finals.append(final)
    assert decoded == ranges and finals == [False, False, False, True]


def test_an_empty_announcement_is_one_final_frame() -> None:
    [frame] = encode_announcement([])
    assert decode_announcement(frame) == ([], True)


def test_a_bad_announcement_entry_names_its_field_and_offset() -> None:
    good = PortRange(0x10, 0x10, Access.READ)
    frame = bytearray(encode_announcement([good, PortRange(0x60, 0x64, Access.READ_WRITE)])[0])
    frame[36] = 0  # access mask of entry 1
    with pytest.raises(FieldValueError) as caught:
        decode_announcement(bytes(frame))
    assert (caught.value.field, caught.value.offset, caught.value.value) == ("entries[1].access", 36, 0)
    frame = bytearray(encode_announcement([good, PortRange(0x60, 0x5F, Access.READ)])[0])
    with pytest.raises(FieldValueError) as caught:
        decode_announcement(bytes(frame))
    assert (caught.value.field, caught.value.offset, caught.value.value) == ("entries[1].last_port", 34, 0x5F)
