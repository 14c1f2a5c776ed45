"""The trace file format: every event kind round-trips; every defect is a TraceError naming where."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path

import pytest

from dispatcher import Registers, Status
from dispatcher.trace import FORMAT_VERSION, MAGIC, TraceError, TraceReader, TraceWriter, dump, new_metadata, read_trace
from dispatcher.trace_records import (
    Acknowledge,
    ClockAdvance,
    Completion,
    Intercept,
    IrqEdge,
    MemoryRead,
    MemoryWrite,
    TraceEvent,
)
from dispatcher.wire import pack_completion
from transports.service.client import io_intercept

HEADER = struct.Struct("<8sHHI")
RECORD = struct.Struct("<BIQQI")  # kind, payload length, virtual_ns, real_ns, CRC-32


def reseal(data: bytearray, offset: int) -> None:
    """Recompute the checksum of the record at ``offset`` after a test changed its bytes on purpose."""
    length = RECORD.unpack_from(data, offset)[1]
    payload = bytes(data[offset + RECORD.size : offset + RECORD.size + length])
    struct.pack_into("<I", data, offset + 21, zlib.crc32(payload, zlib.crc32(bytes(data[offset : offset + 21]))))


def out_frame(port: int, value: int, *, size: int = 1, rip: int = 0x7C00) -> bytes:
    return io_intercept(port, size, write=True, value=value, rip=rip)


def in_frame(port: int, *, size: int = 1, rip: int = 0x7C10) -> bytes:
    return io_intercept(port, size, write=False, rip=rip)


def completion_frame(rax: int, rip: int) -> bytes:
    return pack_completion(0, 0, Status.COMPLETED, Registers.RIP | Registers.RAX, rip, rax)


EVENTS: list[TraceEvent] = [
    Intercept(10, 11, out_frame(0x3F8, 0x41)),
    Completion(10, 12, completion_frame(0x41, 0x7C01)),
    MemoryRead(20, 21, 0x8000, b"\x01\x02\x03"),
    MemoryWrite(30, 31, 0xFFFF_FFFF_0000, bytes(range(40))),
    ClockAdvance(1_000_000, 999),
    Acknowledge(1_000_001, 1000, 0x08),
    Acknowledge(1_000_002, 1001, None),
    IrqEdge(1_000_003, 1002, 14, True),
    IrqEdge(1_000_004, 1003, 14, False),
    Intercept(2**63, 2**40, in_frame(0x3FD)),
]


def write(path: Path, events: list[TraceEvent], **metadata: str) -> None:
    with TraceWriter(
        path, {**new_metadata("api", machine="mymodule:build", machine_args={"size": 3}), **metadata}
    ) as w:
        w.write_all(events)


@pytest.mark.parametrize("name", ["t.trace", "t.trace.gz"])
def test_every_event_kind_round_trips(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    write(path, EVENTS, note="hello")
    trace = read_trace(path)
    assert trace.events == EVENTS
    assert trace.complete
    assert trace.version == FORMAT_VERSION
    assert trace.metadata["machine"] == "mymodule:build"
    assert trace.metadata["machine_args"] == {"size": 3}
    assert trace.metadata["source"] == "api" and trace.metadata["note"] == "hello"
    assert trace.intercepts == 2
    metadata, events = trace  # unpacks as (metadata, events)
    assert metadata is trace.metadata and events is trace.events
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")


def test_the_header_is_as_documented(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    write(path, EVENTS[:1])
    data = path.read_bytes()
    magic, version, flags, length = HEADER.unpack_from(data)
    assert (magic, version, flags) == (MAGIC, FORMAT_VERSION, 0)
    assert json.loads(data[HEADER.size : HEADER.size + length])["source"] == "api"
    start = HEADER.size + length
    kind, size, virtual_ns, real_ns, crc = RECORD.unpack_from(data, start)
    assert (kind, size, virtual_ns, real_ns) == (1, len(EVENTS[0].frame), 10, 11)  # type: ignore[union-attr]
    payload = data[start + RECORD.size : start + RECORD.size + size]
    assert payload == EVENTS[0].frame  # type: ignore[union-attr]
    assert crc == zlib.crc32(payload, zlib.crc32(data[start : start + 21]))  # the header's first 21 bytes, then it


def records_start(data: bytes | bytearray) -> int:
    length: int = HEADER.unpack_from(data)[3]
    return HEADER.size + length


@pytest.mark.parametrize("cut", [1, RECORD.size - 1, RECORD.size + 5])
def test_a_truncated_file_names_offset_and_record(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "t.trace"
    write(path, EVENTS)
    data = path.read_bytes()
    # Cut inside the third record (index 2): its offset follows the first two.
    first = records_start(data)
    second = first + RECORD.size + RECORD.unpack_from(data, first)[1]
    third = second + RECORD.size + RECORD.unpack_from(data, second)[1]
    path.write_bytes(data[: third + cut])
    with pytest.raises(TraceError, match=rf"offset {third}, record 2: .*truncated") as raised:
        read_trace(path)
    assert (raised.value.offset, raised.value.index) == (third, 2)


def test_a_file_cut_between_records_reads_as_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    writer = TraceWriter(path, new_metadata("api"))
    writer.write_all(EVENTS[:2])
    writer.flush()  # a process that died here: no end record
    trace = read_trace(path)
    assert trace.events == EVENTS[:2]
    assert not trace.complete
    assert any("no end record" in line for line in dump(trace))
    writer.close()


def test_a_corrupted_kind_names_offset_and_record(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    write(path, EVENTS)
    data = bytearray(path.read_bytes())
    first = records_start(data)
    second = first + RECORD.size + RECORD.unpack_from(data, first)[1]
    data[second] = 0x77
    reseal(data, second)
    path.write_bytes(data)
    with pytest.raises(TraceError, match=rf"offset {second}, record 1: record kind 119 is unknown"):
        read_trace(path)


@pytest.mark.parametrize("where", ["virtual_ns", "payload"])
def test_a_corrupted_byte_fails_its_record_s_checksum(tmp_path: Path, where: str) -> None:
    path = tmp_path / "t.trace"
    write(path, EVENTS)
    data = bytearray(path.read_bytes())
    first = records_start(data)
    second = first + RECORD.size + RECORD.unpack_from(data, first)[1]
    data[second + (5 if where == "virtual_ns" else RECORD.size + 3)] ^= 0x10
    path.write_bytes(data)
    with pytest.raises(TraceError, match=rf"offset {second}, record 1: .*checksum.*corrupted") as raised:
        read_trace(path)
    assert (raised.value.offset, raised.value.index) == (second, 1)


def test_a_payload_of_the_wrong_length_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    write(path, [ClockAdvance(1, 1)])
    data = bytearray(path.read_bytes())
    first = records_start(data)
    struct.pack_into("<I", data, first + 1, 3)
    data[first + RECORD.size : first + RECORD.size] = b"abc"
    reseal(data, first)
    path.write_bytes(data)
    with pytest.raises(TraceError, match=rf"offset {first}, record 0: a CLOCK payload is 0 bytes, not 3"):
        read_trace(path)


def test_another_version_names_both(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    write(path, EVENTS)
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 8, FORMAT_VERSION + 1)
    path.write_bytes(data)
    with pytest.raises(
        TraceError, match=rf"format version {FORMAT_VERSION + 1}; this reader reads version {FORMAT_VERSION}"
    ):
        read_trace(path)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "too short"),
        (b"NOTATRACE" + bytes(20), "not a trace file"),
        (HEADER.pack(MAGIC, FORMAT_VERSION, 0, 100) + b"{}", "runs past the end"),
        (HEADER.pack(MAGIC, FORMAT_VERSION, 0, 2) + b"[]", "not a JSON object"),
        (HEADER.pack(MAGIC, FORMAT_VERSION, 0, 2) + b"{x", "not JSON"),
        (gzip.compress(b"IDTRACE")[:-4], "gzip layer"),
    ],
)
def test_bad_headers(data: bytes, match: str) -> None:
    with pytest.raises(TraceError, match=match):
        TraceReader(data, path="x.trace").read()


def test_bytes_after_the_end_record_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    write(path, EVENTS[:1])
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(TraceError, match="4 bytes follow the end record"):
        read_trace(path)


def test_a_missing_file_is_a_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        read_trace(tmp_path / "absent.trace")


def test_a_closed_writer_refuses_records(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.trace", new_metadata("api"))
    writer.close()
    writer.close()  # a second close does nothing
    with pytest.raises(ValueError, match="closed"):
        writer.write(EVENTS[0])


def words(line: str) -> str:
    return " ".join(line.split())


def test_dump_decodes_every_kind(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    write(path, EVENTS)
    lines = list(dump(read_trace(path)))
    assert '# machine: "mymodule:build"' in lines
    events = [line for line in lines if not line.startswith("#")]
    assert len(events) == len(EVENTS)
    assert words(events[0]) == "0 0.010us INTERCEPT vp=0 OUT port=0x03f8 size=1 value=0x41 rip=0x7c00"
    assert words(events[1]) == "1 0.010us COMPLETION vp=0 COMPLETED rax=0x41 rip=0x7c01"
    assert words(events[2]).split(" ", 2)[2] == "MEM_READ 0x8000 3 bytes: 01 02 03"
    assert events[3].split()[-1] == "..."
    assert words(events[4]) == "4 1000.000us CLOCK"
    assert events[5].split()[2:] == ["ACK", "vector=0x08"]
    assert events[6].split()[2:] == ["ACK", "vector=none"]
    assert events[7].split()[2:] == ["IRQ", "line=14", "raise"]
    assert events[8].split()[2:] == ["IRQ", "line=14", "lower"]
    assert words(events[9]).split(" ", 2)[2] == "INTERCEPT vp=0 IN port=0x03fd size=1 rip=0x7c10"


def test_dump_limit() -> None:
    from dispatcher.trace import Trace

    lines = list(dump(Trace({}, EVENTS), limit=3))
    assert len(lines) == 4 and lines[-1] == f"# ... {len(EVENTS) - 3} more events"
