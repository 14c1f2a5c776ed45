"""The port announcement: which ports a service wants intercepted.

Modelled on HvInstallIntercept: the service tells the VMM every port range
and direction it claims, so the VMM installs exactly those intercepts. One
announcement may span several frames; the last carries the FINAL flag.
The layout is ``wire.ANNOUNCEMENT_HEAD`` followed by ``wire.ANNOUNCEMENT_ENTRY``s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from .errors import FieldValueError
from .fields import Access
from .wire import ANNOUNCEMENT, ANNOUNCEMENT_ENTRY, ANNOUNCEMENT_HEAD, HEADER_SIZE, MAX_PAYLOAD, Offset, check_header

__all__ = ["PortRange", "decode_announcement", "encode_announcement"]

_FIXED = ANNOUNCEMENT_HEAD.size - HEADER_SIZE
ENTRIES_PER_FRAME = (MAX_PAYLOAD - _FIXED) // ANNOUNCEMENT_ENTRY.size
FINAL = 1
_KNOWN = frozenset({ANNOUNCEMENT})


class PortRange(NamedTuple):
    """Ports ``first..last`` (inclusive) claimed for ``access``."""

    first: int
    last: int
    access: Access


def encode_announcement(ranges: Iterable[PortRange], *, partition: int = 0, version: int = 1) -> list[bytes]:
    """Encode the whole port set as one or more frames (at least one)."""
    entries = list(ranges)
    frames = []
    for start in range(0, max(len(entries), 1), ENTRIES_PER_FRAME):
        chunk = entries[start : start + ENTRIES_PER_FRAME]
        final = start + ENTRIES_PER_FRAME >= len(entries)
        payload = _FIXED + ANNOUNCEMENT_ENTRY.size * len(chunk)
        head = ANNOUNCEMENT_HEAD.pack(
            ANNOUNCEMENT, payload, 0, 0, 0, partition, version, FINAL if final else 0, len(chunk), start
        )
        frames.append(head + b"".join(ANNOUNCEMENT_ENTRY.pack(*r) for r in chunk))
    return frames


def decode_announcement(data: bytes | bytearray | memoryview) -> tuple[Sequence[PortRange], bool]:
    """Parse one announcement frame; return its ranges and whether it is the last.

    Raises a :class:`~dispatcher.FrameError` naming the field, its offset and value.
    """
    payload_size = check_header(data, _KNOWN)
    *_, _version, flags, count, _first_index = ANNOUNCEMENT_HEAD.unpack_from(data)
    if payload_size < _FIXED + count * ANNOUNCEMENT_ENTRY.size:
        raise FieldValueError(
            f"{count} entries need {_FIXED + count * ANNOUNCEMENT_ENTRY.size} payload bytes",
            field="entry_count",
            offset=Offset.ANNOUNCEMENT_COUNT,
            value=count,
        )
    ranges = []
    for i in range(count):
        offset = ANNOUNCEMENT_HEAD.size + i * ANNOUNCEMENT_ENTRY.size
        first, last, access = ANNOUNCEMENT_ENTRY.unpack_from(data, offset)
        if last < first:
            raise FieldValueError(
                f"the range's last port is below its first ({first:#x})",
                field=f"entries[{i}].last_port",
                offset=offset + 2,
                value=last,
            )
        if not 1 <= access <= 3:
            raise FieldValueError(
                "access must be 1 (read), 2 (write) or 3 (both)",
                field=f"entries[{i}].access",
                offset=offset + 4,
                value=access,
            )
        ranges.append(PortRange(first, last, Access(access)))
    return ranges, bool(flags & FINAL)
