"""The port announcement: which ports a service wants intercepted.

Modelled on HvInstallIntercept: the service tells the VMM every port range
and direction it claims, so the VMM installs exactly those intercepts. One
announcement may span several frames; the last carries the FINAL flag.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from .errors import FieldValueError
from .message import HEADER, HEADER_SIZE, MAX_PAYLOAD, check_header

__all__ = ["ANNOUNCEMENT", "PortRange", "decode_announcement", "encode_announcement"]

ANNOUNCEMENT = 0x1D00_0002
_HEAD = struct.Struct("<I4BQ" "BBHI")  # fmt: skip
_ENTRY = struct.Struct("<HHBxxx")
_FIXED = _HEAD.size - HEADER_SIZE
ENTRIES_PER_FRAME = (MAX_PAYLOAD - _FIXED) // _ENTRY.size
FINAL = 1


class PortRange(NamedTuple):
    """Ports ``first..last`` (inclusive) claimed for ``access`` (1 read, 2 write, 3 both)."""

    first: int
    last: int
    access: int


def encode_announcement(ranges: Iterable[PortRange], *, partition: int = 0, version: int = 1) -> list[bytes]:
    """Encode the whole port set as one or more frames (at least one)."""
    entries = list(ranges)
    frames = []
    for start in range(0, max(len(entries), 1), ENTRIES_PER_FRAME):
        chunk = entries[start : start + ENTRIES_PER_FRAME]
        final = start + ENTRIES_PER_FRAME >= len(entries)
        payload = _FIXED + _ENTRY.size * len(chunk)
        head = _HEAD.pack(ANNOUNCEMENT, payload, 0, 0, 0, partition, version, FINAL if final else 0, len(chunk), start)
        frames.append(head + b"".join(_ENTRY.pack(*r) for r in chunk))
    return frames


def decode_announcement(data: bytes | bytearray | memoryview) -> tuple[Sequence[PortRange], bool]:
    """Parse one announcement frame; return its ranges and whether it is the last."""
    message_type = HEADER.unpack_from(data)[0] if len(data) >= HEADER_SIZE else 0
    payload_size = check_header(data, message_type, frozenset({ANNOUNCEMENT}))
    *_, _version, flags, count, _first_index = _HEAD.unpack_from(data)
    if payload_size < _FIXED + count * _ENTRY.size:
        raise FieldValueError(
            f"{count} entries need {_FIXED + count * _ENTRY.size} payload bytes",
            field="entry_count",
            offset=18,
            value=count,
        )
    ranges = []
    for i in range(count):
        offset = _HEAD.size + i * _ENTRY.size
        first, last, access = _ENTRY.unpack_from(data, offset)
        if last < first or not 1 <= access <= 3:
            raise FieldValueError(
                "range must have first <= last and access 1, 2 or 3", field="entry", offset=offset, value=first
            )
        ranges.append(PortRange(first, last, access))
    return ranges, bool(flags & FINAL)
