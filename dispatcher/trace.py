"""The trace file: a VM's intercepts, completions and the rest, as a versioned binary file.

Layout (little-endian; docs/TRACE_FORMAT.md has the full description)::

    file header   magic b"IDTRACE\\0" (8 bytes), version u16, flags u16, metadata length u32
    metadata      that many bytes of UTF-8 JSON (an object)
    records       each: kind u8, payload length u32, virtual_ns u64, real_ns u64, then the payload
    end record    kind 0, payload: the number of records before it (u64); written by close()

A file that starts with gzip's magic is read through gzip; a path ending in
``.gz`` is written that way. :class:`TraceWriter` buffers records and
writes them in blocks; :func:`read_trace` reads the whole file and decodes
it in one pass. Every defect (a bad magic, another version, a record cut
short, an unknown kind, a payload of the wrong length) raises
:class:`TraceError` naming the byte offset and the record's index.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from . import trace_records as tr
from .errors import DispatchError, FrameError
from .fields import AccessType
from .message import decode_message
from .wire import Registers, Status, decode_completion

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Kind",
    "Trace",
    "TraceError",
    "TraceReader",
    "TraceWriter",
    "acknowledge_payload",
    "describe",
    "dump",
    "edge_payload",
    "memory_payload",
    "new_metadata",
    "read_trace",
]

MAGIC = b"IDTRACE\x00"
FORMAT_VERSION = 1
_GZIP_MAGIC = b"\x1f\x8b"
_FILE_HEADER = struct.Struct("<8sHHI")
# A record's header: kind, payload length, virtual_ns, real_ns, then the CRC-32 of those 21 bytes and the payload.
_RECORD = struct.Struct("<BIQQI")
_HEAD = struct.Struct("<BIQQ")
_pack_head, _pack_crc, _crc32 = _HEAD.pack, struct.Struct("<I").pack, zlib.crc32
_ADDRESS = struct.Struct("<Q")
_VECTOR = struct.Struct("<h")
_EDGE = struct.Struct("<IB")
_COUNT = struct.Struct("<Q")
_FLUSH_AT = 1 << 18  # bytes buffered before a write to the file
_U64 = (1 << 64) - 1


class Kind:
    """Record kinds (the first byte of a record)."""

    END = 0
    INTERCEPT = 1
    COMPLETION = 2
    MEMORY_READ = 3
    MEMORY_WRITE = 4
    CLOCK_ADVANCE = 5
    ACKNOWLEDGE = 6
    IRQ_EDGE = 7


_NAMES = {
    Kind.END: "END",
    Kind.INTERCEPT: "INTERCEPT",
    Kind.COMPLETION: "COMPLETION",
    Kind.MEMORY_READ: "MEM_READ",
    Kind.MEMORY_WRITE: "MEM_WRITE",
    Kind.CLOCK_ADVANCE: "CLOCK",
    Kind.ACKNOWLEDGE: "ACK",
    Kind.IRQ_EDGE: "IRQ",
}


class TraceError(DispatchError):
    """A trace file that cannot be read: names the file, the byte offset and the record index where known."""

    def __init__(self, reason: str, *, path: str = "", offset: int | None = None, index: int | None = None) -> None:
        where = [path] if path else []
        if offset is not None:
            where.append(f"offset {offset}")
        if index is not None:
            where.append(f"record {index}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)
        self.reason = reason
        self.path = path
        self.offset = offset
        self.index = index


def new_metadata(
    source: str,
    *,
    machine: str | None = None,
    machine_args: Mapping[str, Any] | None = None,
    partition: int | None = None,
    clock: str = "virtual",
    start_ns: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """A trace's metadata document with the fields every trace has (docs/TRACE_FORMAT.md).

    ``source`` says what made it ("serve", "examples.pc", "api"); ``machine``
    (``"MODULE:ATTR"``, a factory) and ``machine_args`` (its keyword
    arguments) name what a replay runs it against; ``clock`` is "virtual"
    (the devices ran on a virtual clock, repeated exactly on replay) or
    "real"; ``start_ns`` is that clock's reading when recording began.
    """
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
        "machine": machine,
        "machine_args": dict(machine_args or {}),
        "partition": partition,
        "clock": clock,
        "start_ns": start_ns,
        **extra,
    }


def memory_payload(address: int, data: bytes) -> bytes:
    """A MEM_READ or MEM_WRITE record's payload."""
    return _ADDRESS.pack(address) + data


def acknowledge_payload(vector: int | None) -> bytes:
    """An ACK record's payload."""
    return _VECTOR.pack(-1 if vector is None else vector)


def edge_payload(line: int, level: bool) -> bytes:
    """An IRQ record's payload."""
    return _EDGE.pack(line, level)


def _payload(event: tr.TraceEvent) -> tuple[int, bytes]:
    kind = type(event)
    if kind is tr.Intercept or kind is tr.Completion:
        frame = event.frame  # type: ignore[union-attr]
        return (Kind.INTERCEPT if kind is tr.Intercept else Kind.COMPLETION), bytes(frame)
    if kind is tr.MemoryRead or kind is tr.MemoryWrite:
        address, data = event.address, event.data  # type: ignore[union-attr]
        return (Kind.MEMORY_READ if kind is tr.MemoryRead else Kind.MEMORY_WRITE), memory_payload(address, data)
    if kind is tr.ClockAdvance:
        return Kind.CLOCK_ADVANCE, b""
    if kind is tr.Acknowledge:
        vector = event.vector  # type: ignore[union-attr]
        return Kind.ACKNOWLEDGE, acknowledge_payload(vector)
    if kind is tr.IrqEdge:
        return Kind.IRQ_EDGE, edge_payload(event.line, event.level)  # type: ignore[union-attr]
    raise TypeError(f"not a trace event: {event!r:.80}")


def _open_for_writing(path: str, mode: str) -> IO[bytes]:
    # The writer keeps the file open across calls: closed by TraceWriter.close.
    if path.endswith(".gz"):
        return gzip.open(path, mode, compresslevel=6)  # type: ignore[return-value]
    return open(path, mode)


class TraceWriter:
    """Writes a trace file: the header at once, records buffered, the end record on :meth:`close`.

    ``target`` is a path (``.gz``: gzip-compressed; ``exclusive``: raise
    ``FileExistsError`` rather than replace a file) or a binary file the
    writer then owns. Safe to call from several threads; records keep the
    order of the calls.
    """

    def __init__(
        self, target: str | os.PathLike[str] | IO[bytes], metadata: Mapping[str, Any], *, exclusive: bool = False
    ) -> None:
        if isinstance(target, str | os.PathLike):
            path = os.fspath(target)
            self.path = path
            self._file: IO[bytes] = _open_for_writing(path, "xb" if exclusive else "wb")
        else:
            self.path = str(getattr(target, "name", ""))
            self._file = target
        self.metadata = dict(metadata)
        document = json.dumps(self.metadata, sort_keys=True).encode()
        self._buffer = bytearray(_FILE_HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(document)) + document)
        self._lock = threading.Lock()
        self.records = 0
        """Records written so far (the end record not counted)."""
        self.closed = False

    def record(self, kind: int, virtual_ns: int, real_ns: int, payload: bytes = b"") -> None:
        """Append one record (see :class:`~dispatcher.trace.Kind`); the fast path for recorders."""
        with self._lock:
            if self.closed:
                raise ValueError(f"trace {self.path or '(stream)'} is closed")
            buffer = self._buffer
            head = _pack_head(kind, len(payload), virtual_ns & _U64, real_ns & _U64)
            buffer += head
            buffer += _pack_crc(_crc32(payload, _crc32(head)))
            buffer += payload
            self.records += 1
            if len(buffer) >= _FLUSH_AT:
                self._file.write(buffer)
                buffer.clear()

    def write(self, event: tr.TraceEvent) -> None:
        """Append one event."""
        kind, payload = _payload(event)
        self.record(kind, event.virtual_ns, event.real_ns, payload)

    def write_all(self, events: Iterable[tr.TraceEvent]) -> None:
        for event in events:
            self.write(event)

    def flush(self) -> None:
        """Write what is buffered to the file (and flush the file)."""
        with self._lock:
            if not self.closed:
                self._file.write(self._buffer)
                self._buffer.clear()
                self._file.flush()

    def close(self) -> None:
        """Write the end record and close the file; later calls do nothing."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            count = _COUNT.pack(self.records)
            head = _pack_head(Kind.END, len(count), 0, 0)
            self._buffer += head + _pack_crc(_crc32(count, _crc32(head))) + count
            try:
                self._file.write(self._buffer)
                self._buffer.clear()
            finally:
                self._file.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Trace:
    """A whole trace: its metadata, its events in order, and whether its end record was there.

    Unpacks as ``metadata, events = read_trace(path)``.
    """

    __slots__ = ("complete", "events", "metadata", "version")

    def __init__(
        self,
        metadata: dict[str, Any],
        events: list[tr.TraceEvent],
        complete: bool = True,
        version: int = FORMAT_VERSION,
    ) -> None:
        self.metadata = metadata
        self.events = events
        self.complete = complete
        self.version = version

    def __iter__(self) -> Iterator[Any]:
        return iter((self.metadata, self.events))

    def __len__(self) -> int:
        return len(self.events)

    @property
    def intercepts(self) -> int:
        """How many Intercept events it holds."""
        return sum(1 for event in self.events if type(event) is tr.Intercept)


_new = tuple.__new__  # a NamedTuple without its Python-level __new__


class TraceReader:
    """Decodes a trace held in memory; :meth:`read` gives the :class:`Trace`.

    ``path`` only names the file in errors.
    """

    def __init__(self, data: bytes, *, path: str = "") -> None:
        self.path = path
        if data[:2] == _GZIP_MAGIC:
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as error:
                raise TraceError(f"the gzip layer cannot be read: {error}", path=path) from None
        self.data = data
        if len(data) < _FILE_HEADER.size:
            raise TraceError(f"{len(data)} bytes: too short for a trace header", path=path, offset=0)
        magic, version, _flags, length = _FILE_HEADER.unpack_from(data)
        if magic != MAGIC:
            raise TraceError(f"magic {magic!r} is not {MAGIC!r}: not a trace file", path=path, offset=0)
        if version != FORMAT_VERSION:
            raise TraceError(
                f"format version {version}; this reader reads version {FORMAT_VERSION}", path=path, offset=8
            )
        self.version = version
        end = _FILE_HEADER.size + length
        if end > len(data):
            raise TraceError(
                f"the metadata ({length} bytes) runs past the end of the file ({len(data)} bytes)",
                path=path,
                offset=_FILE_HEADER.size,
            )
        try:
            metadata = json.loads(data[_FILE_HEADER.size : end].decode())
        except (UnicodeDecodeError, ValueError) as error:
            raise TraceError(f"the metadata is not JSON: {error}", path=path, offset=_FILE_HEADER.size) from None
        if not isinstance(metadata, dict):
            raise TraceError("the metadata is not a JSON object", path=path, offset=_FILE_HEADER.size)
        self.metadata: dict[str, Any] = metadata
        self.records_offset = end

    def read(self) -> Trace:
        """Every event, in order; raises :class:`TraceError` at the first defect."""
        events: list[tr.TraceEvent] = []
        append = events.append
        data, path = self.data, self.path
        size = len(data)
        unpack_record, record_size, head_size = _RECORD.unpack_from, _RECORD.size, _HEAD.size
        crc32, view = _crc32, memoryview(data)
        unpack_address, unpack_vector, unpack_edge = _ADDRESS.unpack_from, _VECTOR.unpack_from, _EDGE.unpack_from
        intercept, completion = tr.Intercept, tr.Completion
        offset = self.records_offset
        index = 0
        complete = False
        while offset < size:
            if offset + record_size > size:
                raise TraceError(
                    f"the record header needs {record_size} bytes, {size - offset} remain: the file is truncated",
                    path=path,
                    offset=offset,
                    index=index,
                )
            kind, length, virtual_ns, real_ns, crc = unpack_record(data, offset)
            start = offset + record_size
            stop = start + length
            if stop > size:
                raise TraceError(
                    f"the {_NAMES.get(kind, 'record')} payload needs {length} bytes, {size - start} remain: "
                    "the file is truncated",
                    path=path,
                    offset=offset,
                    index=index,
                )
            if crc32(view[start:stop], crc32(view[offset : offset + head_size])) != crc:
                raise TraceError(
                    "the record's checksum does not match its bytes: the file is corrupted", path=path, offset=offset,
                    index=index,
                )  # fmt: skip
            if kind == 1:  # Kind.INTERCEPT, the common case first
                append(_new(intercept, (virtual_ns, real_ns, data[start:stop])))
            elif kind == 2:
                append(_new(completion, (virtual_ns, real_ns, data[start:stop])))
            elif kind == Kind.MEMORY_READ or kind == Kind.MEMORY_WRITE:
                _check_length(length, _ADDRESS.size, kind, path, offset, index, at_least=True)
                (address,) = unpack_address(data, start)
                cls = tr.MemoryRead if kind == Kind.MEMORY_READ else tr.MemoryWrite
                append(cls(virtual_ns, real_ns, address, data[start + _ADDRESS.size : stop]))
            elif kind == Kind.CLOCK_ADVANCE:
                _check_length(length, 0, kind, path, offset, index)
                append(tr.ClockAdvance(virtual_ns, real_ns))
            elif kind == Kind.ACKNOWLEDGE:
                _check_length(length, _VECTOR.size, kind, path, offset, index)
                (vector,) = unpack_vector(data, start)
                if not -1 <= vector <= 0xFF:
                    raise TraceError(f"ACK vector {vector} is not -1..255", path=path, offset=start, index=index)
                append(tr.Acknowledge(virtual_ns, real_ns, None if vector < 0 else vector))
            elif kind == Kind.IRQ_EDGE:
                _check_length(length, _EDGE.size, kind, path, offset, index)
                line, level = unpack_edge(data, start)
                if level > 1:
                    raise TraceError(f"IRQ level {level} is not 0 or 1", path=path, offset=start + 4, index=index)
                append(tr.IrqEdge(virtual_ns, real_ns, line, bool(level)))
            elif kind == Kind.END:
                _check_length(length, _COUNT.size, kind, path, offset, index)
                (count,) = _COUNT.unpack_from(data, start)
                if count != index:
                    raise TraceError(
                        f"the end record counts {count} records, {index} came before it", path=path, offset=offset,
                        index=index,
                    )  # fmt: skip
                if stop != size:
                    raise TraceError(f"{size - stop} bytes follow the end record", path=path, offset=stop)
                complete = True
            else:
                raise TraceError(f"record kind {kind} is unknown", path=path, offset=offset, index=index)
            offset = stop
            index += 1
        return Trace(self.metadata, events, complete, self.version)


def _check_length(
    length: int, expected: int, kind: int, path: str, offset: int, index: int, *, at_least: bool = False
) -> None:
    if length < expected or (length != expected and not at_least):
        need = f"at least {expected}" if at_least else str(expected)
        raise TraceError(
            f"a {_NAMES[kind]} payload is {need} bytes, not {length}", path=path, offset=offset, index=index
        )


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a whole trace file (plain or gzip); raises :class:`TraceError` naming offset and record."""
    name = os.fspath(path)
    try:
        data = Path(name).read_bytes()
    except OSError as error:
        raise TraceError(f"cannot read: {error.strerror or error}", path=name) from None
    return TraceReader(data, path=name).read()


# -- the text dump -------------------------------------------------------------------------------------------------


def _intercept_text(frame: bytes) -> str:
    try:
        message = decode_message(frame)
    except FrameError as error:
        return f"(bad frame: {error}) {frame[:32].hex()}"
    info = message.access_info
    size = info.access_size
    write = message.access_type == AccessType.WRITE
    if info.string_op:
        name = ("rep " if info.rep_prefix else "") + ("OUTS" if write else "INS")
        detail = f" rcx={message.rcx:#x} rsi={message.rsi:#x} rdi={message.rdi:#x}"
    else:
        name = "OUT" if write else "IN"
        detail = f" value={message.rax & ((1 << 8 * size) - 1):#0{2 + 2 * size}x}" if write else ""
    return (
        f"vp={message.vp_index} {name:<8} port={message.port_number:#06x} size={size}{detail} rip={message.rip:#x}"
        + (f" partition={message.source_partition}" if message.source_partition else "")
    )


def _completion_text(frame: bytes) -> str:
    try:
        completion = decode_completion(frame)
    except FrameError as error:
        return f"(bad frame: {error}) {frame[:32].hex()}"
    parts = [f"vp={completion.vp_index}", completion.status.name]
    registers = completion.registers
    if registers & Registers.RAX:
        parts.append(f"rax={completion.rax:#x}")
    if registers & Registers.RIP:
        parts.append(f"rip={completion.rip:#x}")
    for flag, name, value in (
        (Registers.RCX, "rcx", completion.rcx),
        (Registers.RSI, "rsi", completion.rsi),
        (Registers.RDI, "rdi", completion.rdi),
    ):
        if registers & flag:
            parts.append(f"{name}={value:#x}")
    if completion.status != Status.COMPLETED:
        parts.append(f"detail={completion.detail:#x}")
    return " ".join(parts)


def _data_text(data: bytes) -> str:
    shown = data[:16].hex(" ")
    return f"{len(data)} bytes: {shown}{' ...' if len(data) > 16 else ''}"


def describe(event: tr.TraceEvent) -> str:
    """One event's kind and fields in words: ``INTERCEPT vp=0 OUT port=0x03f8 size=1 value=0x41 rip=0x7c12``."""
    kind = type(event)
    if kind is tr.Intercept:
        return f"INTERCEPT  {_intercept_text(event.frame)}"  # type: ignore[union-attr]
    if kind is tr.Completion:
        return f"COMPLETION {_completion_text(event.frame)}"  # type: ignore[union-attr]
    if kind is tr.MemoryRead or kind is tr.MemoryWrite:
        name = "MEM_READ " if kind is tr.MemoryRead else "MEM_WRITE"
        return f"{name}  {event.address:#x} {_data_text(event.data)}"  # type: ignore[union-attr]
    if kind is tr.ClockAdvance:
        return "CLOCK"
    if kind is tr.Acknowledge:
        vector = event.vector  # type: ignore[union-attr]
        return f"ACK        vector={'none' if vector is None else f'{vector:#04x}'}"
    if kind is tr.IrqEdge:
        return f"IRQ        line={event.line} {'raise' if event.level else 'lower'}"  # type: ignore[union-attr]
    raise TypeError(f"not a trace event: {event!r:.80}")


def dump(trace: Trace, *, limit: int | None = None) -> Iterator[str]:
    """The trace as text, one line per event: index, virtual time in µs, kind and fields.

    Metadata first, as ``# key: value`` lines; at most ``limit`` events.
    """
    for key in sorted(trace.metadata):
        yield f"# {key}: {json.dumps(trace.metadata[key], sort_keys=True)}"
    events = trace.events if limit is None else trace.events[:limit]
    for index, event in enumerate(events):
        yield f"{index:>8} {event.virtual_ns / 1000:>16.3f}us  {describe(event)}"
    if limit is not None and len(trace.events) > limit:
        yield f"# ... {len(trace.events) - limit} more events"
    if not trace.complete:
        yield "# no end record: the recording did not close the file (the process ended early?)"
