"""The completion frame: the register updates sent back for one intercept.

Layout in docs/PROTOCOL.md. It keeps the 16-byte message header shape and
uses a message type outside the hypervisor's 0x8000_0000+ range.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from .errors import FieldValueError
from .message import HEADER, HEADER_SIZE, check_header

__all__ = [
    "COMPLETION",
    "PROTOCOL_VERSION",
    "UNKNOWN_VP",
    "Completion",
    "Registers",
    "Status",
    "decode_completion",
]

COMPLETION = 0x1D00_0001
PROTOCOL_VERSION = 1
UNKNOWN_VP = 0xFFFF_FFFF

COMPLETION_STRUCT = struct.Struct("<I4BQ" "IBBH" "QQQQQ" "HBBI")  # fmt: skip
COMPLETION_SIZE = COMPLETION_STRUCT.size
_PAYLOAD = COMPLETION_SIZE - HEADER_SIZE


class Status(enum.IntEnum):
    """Why a completion looks the way it does. Values 0-127 are reserved to this protocol."""

    COMPLETED = 0
    HANDLER_FAILED = 1
    DEADLINE_EXCEEDED = 2
    PROTOCOL_ERROR = 3
    UNSUPPORTED = 4
    MEMORY_ERROR = 5


class Registers(enum.IntFlag):
    """Which registers a completion sets; the others stay as they were."""

    NONE = 0
    RIP = 1
    RAX = 2
    RCX = 4
    RSI = 8
    RDI = 16


class Completion(NamedTuple):
    """One decoded (or to-be-encoded) completion frame."""

    vp_index: int
    status: Status = Status.COMPLETED
    registers: Registers = Registers.NONE
    rip: int = 0
    rax: int = 0
    rcx: int = 0
    rsi: int = 0
    rdi: int = 0
    source_partition: int = 0
    port_number: int = 0
    access_info: int = 0
    detail: int = 0
    version: int = PROTOCOL_VERSION

    def to_bytes(self) -> bytes:
        return COMPLETION_STRUCT.pack(
            COMPLETION,
            _PAYLOAD,
            0,
            0,
            0,
            self.source_partition,
            self.vp_index,
            self.version,
            self.status,
            self.registers,
            self.rip,
            self.rax,
            self.rcx,
            self.rsi,
            self.rdi,
            self.port_number,
            self.access_info,
            0,
            self.detail,
        )


_KNOWN = frozenset({COMPLETION})


def decode_completion(data: bytes | bytearray | memoryview) -> Completion:
    """Parse one completion frame; raise a ``FrameError`` naming what is wrong."""
    message_type = HEADER.unpack_from(data)[0] if len(data) >= HEADER_SIZE else 0
    payload_size = check_header(data, message_type, _KNOWN)
    if payload_size < _PAYLOAD:
        raise FieldValueError(
            f"a completion needs {_PAYLOAD} payload bytes", field="payload_size", offset=4, value=payload_size
        )
    (
        *_,
        partition,
        vp_index,
        version,
        status,
        registers,
        rip,
        rax,
        rcx,
        rsi,
        rdi,
        port,
        access_info,
        _reserved,
        detail,
    ) = COMPLETION_STRUCT.unpack_from(data)
    if version != PROTOCOL_VERSION:
        raise FieldValueError(
            f"this side speaks protocol version {PROTOCOL_VERSION}", field="version", offset=20, value=version
        )
    try:
        known_status = Status(status)
    except ValueError:
        raise FieldValueError("not a status this version defines", field="status", offset=21, value=status) from None
    return Completion(
        vp_index=vp_index,
        status=known_status,
        registers=Registers(registers & 0x1F),
        rip=rip,
        rax=rax,
        rcx=rcx,
        rsi=rsi,
        rdi=rdi,
        source_partition=partition,
        port_number=port,
        access_info=access_info,
        detail=detail,
        version=version,
    )
