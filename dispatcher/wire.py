"""Every frame of the protocol, laid out once: types, sizes, named offsets and ``struct`` layouts.

All frames share the 16-byte message header of the I/O port intercept
message and are at most one 256-byte message slot long. Byte tables for
each frame are in docs/PROTOCOL.md; this module is their only definition in
code. Hot paths pack and unpack with the ``Struct`` objects here directly;
slow paths use :func:`pack_completion` and :func:`decode_completion`.

The header rule: PayloadSize is byte 4 in the hypervisor ABI's layout, or
byte 7 in the seed page's drawing (bytes 4-6 zero). :func:`payload_size`
applies it; :func:`check_header` adds the checks every decoder shares.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Iterator
from typing import Final, NamedTuple

from .errors import FieldValueError, ShortFrameError, UnknownMessageTypeError

__all__ = [
    "ANNOUNCEMENT",
    "ANNOUNCEMENT_ENTRY",
    "ANNOUNCEMENT_HEAD",
    "COMPLETION",
    "COMPLETION_PAYLOAD",
    "COMPLETION_SIZE",
    "COMPLETION_STRUCT",
    "CONTROL_REPLY",
    "CONTROL_REPLY_HEAD",
    "CONTROL_REQUEST",
    "CONTROL_REQUEST_STRUCT",
    "COUNTERS",
    "ECHO",
    "HEADER",
    "HEADER_SIZE",
    "HELLO",
    "HELLO_REPLY",
    "HELLO_REPLY_HEAD",
    "HELLO_STRUCT",
    "IDS",
    "INTERCEPT",
    "INTERCEPT_LEAN",
    "INTERCEPT_SIZE",
    "IO_PORT_INTERCEPT",
    "IO_PORT_PAYLOAD_SIZE",
    "LIFECYCLE_HEAD",
    "LIFECYCLE_REPLY",
    "LIFECYCLE_REQUEST",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "REGION",
    "REGION_STRUCT",
    "REGISTER_FLAGS",
    "SEGMENT",
    "SESSION_MAJOR",
    "SESSION_MINOR",
    "SLOT_SIZE",
    "STRING_FIELDS",
    "UNKNOWN_VP",
    "VALID_ACCESS_INFO",
    "Completion",
    "Offset",
    "Registers",
    "Status",
    "check_header",
    "check_intercept",
    "check_io_payload",
    "decode_completion",
    "document_chunks",
    "frame_ids",
    "message_type",
    "pack_completion",
    "pack_completion_body",
    "payload_size",
]

# Message types. The hypervisor's own are 0x8000_0000 and up; this protocol's are 0x1D00_00xx.
IO_PORT_INTERCEPT: Final = 0x8001_0000
COMPLETION: Final = 0x1D00_0001
ANNOUNCEMENT: Final = 0x1D00_0002
REGION: Final = 0x1D00_0003
CONTROL_REQUEST: Final = 0x1D00_0004
CONTROL_REPLY: Final = 0x1D00_0005
HELLO: Final = 0x1D00_0006
HELLO_REPLY: Final = 0x1D00_0007
LIFECYCLE_REQUEST: Final = 0x1D00_0008
LIFECYCLE_REPLY: Final = 0x1D00_0009

PROTOCOL_VERSION: Final = 1
UNKNOWN_VP: Final = 0xFFFF_FFFF
"""The VpIndex of a completion answering a frame too short to name its VP."""
SESSION_MAJOR: Final = 1
"""The opening exchange's major version: a HELLO with another one is refused (INCOMPATIBLE_VERSION)."""
SESSION_MINOR: Final = 0
"""The opening exchange's minor version: additions a peer of the same major may ignore."""

HEADER_SIZE: Final = 16
MAX_PAYLOAD: Final = 240
SLOT_SIZE: Final = HEADER_SIZE + MAX_PAYLOAD
IO_PORT_PAYLOAD_SIZE: Final = 128
INTERCEPT_SIZE: Final = HEADER_SIZE + IO_PORT_PAYLOAD_SIZE


class Offset(enum.IntEnum):
    """Byte offsets of the fields that code reads directly from a frame."""

    MESSAGE_TYPE = 0
    PAYLOAD_SIZE = 4
    MESSAGE_FLAGS = 5
    SEED_PAYLOAD_SIZE = 7  # PayloadSize in the seed page's drawing of the header
    PARTITION = 8  # every frame: the source partition
    VP_INDEX = 16  # intercept and completion
    # The I/O port intercept.
    LENGTH_CR8 = 20
    ACCESS_TYPE = 21
    EXECUTION_STATE = 22
    CS = 24
    RIP = 40
    RFLAGS = 48
    PORT = 56
    ACCESS_INFO = 58
    INSTRUCTION_BYTE_COUNT = 59
    RAX = 64
    INSTRUCTION_BYTES = 72
    DS = 88
    ES = 104
    RCX = 120
    RSI = 128
    RDI = 136
    # The completion.
    COMPLETION_VERSION = 20
    COMPLETION_STATUS = 21
    COMPLETION_REGISTERS = 22
    COMPLETION_RIP = 24
    COMPLETION_RAX = 32
    COMPLETION_RCX = 40  # then RSI and RDI
    COMPLETION_DETAIL = 68
    # The announcement.
    ANNOUNCEMENT_COUNT = 18
    # The region frame.
    REGION_VERSION = 16
    REGION_FLAGS = 17
    REGION_SIZE = 32
    REGION_FD_OFFSET = 40
    # The control request and reply.
    CONTROL_VERSION = 16
    CONTROL_REQUEST_KIND = 17
    CONTROL_REQUEST_FLAGS = 18
    CONTROL_REPLY_FLAGS = 17
    CONTROL_REPLY_STATUS = 18
    CONTROL_REQUEST_ID = 20
    CONTROL_REPLY_OFFSET = 24
    CONTROL_REPLY_DATA = 28
    # The HELLO and HELLO_REPLY frames of the opening exchange.
    HELLO_MAJOR = 16
    HELLO_MINOR = 18
    HELLO_CAPABILITIES = 20
    HELLO_STATUS = 24
    HELLO_REASON_LENGTH = 26
    HELLO_REASON = 28
    # The lifecycle request and reply (the same fixed part).
    LIFECYCLE_VERSION = 16
    LIFECYCLE_VERB = 17  # the request's Verb; the reply's Status
    LIFECYCLE_FLAGS = 18
    LIFECYCLE_REQUEST_ID = 20
    LIFECYCLE_OFFSET = 24
    LIFECYCLE_DATA = 28


# The header: MessageType, four bytes (PayloadSize and MessageFlags in the ABI), the source partition.
HEADER: Final = struct.Struct("<I4BQ")
_SEGMENT = "QIHH"  # base, limit, selector, attributes
INTERCEPT: Final = struct.Struct(
    "<I4BQ" "IBBH" + _SEGMENT + "QQ" "HBBI" "Q" "16s" + _SEGMENT + _SEGMENT + "QQQ"
)  # fmt: skip
"""HV_X64_IO_PORT_INTERCEPT_MESSAGE: header bytes, partition, VpIndex, InstructionLength|Cr8,
AccessType, ExecutionState, CS, RIP, RFLAGS, PortNumber, AccessInfo, InstructionByteCount,
reserved, RAX, InstructionBytes, DS, ES, RCX, RSI, RDI."""
INTERCEPT_LEAN: Final = struct.Struct("<I4BQ" "IBBH" "14xH" "QQ" "HBBI" "Q")  # fmt: skip
"""The intercept up to RAX without CS's base, limit and selector: what a port I/O decision reads."""
STRING_FIELDS: Final = struct.Struct("<QIBBH14xHQQHBB4xQ16s32xQQQ")
"""The intercept from the partition on, DS and ES skipped: what a string I/O plan reads (at offset 8)."""
SEGMENT: Final = struct.Struct("<" + _SEGMENT)
"""One segment register, at Offset.CS, Offset.DS or Offset.ES."""
COUNTERS: Final = struct.Struct("<QQQ")
"""RCX, RSI and RDI: at Offset.RCX in the intercept, at Offset.COMPLETION_RCX in the completion."""
REGISTER_FLAGS: Final = struct.Struct("<H")
"""A completion's Registers, at Offset.COMPLETION_REGISTERS."""
IDS: Final = struct.Struct("<QI")
"""The source partition and VpIndex, at Offset.PARTITION."""
ECHO: Final = struct.Struct("<Q8xHB5xQ")
"""RIP, PortNumber, AccessInfo and RAX, at Offset.RIP: what a refused intercept's completion echoes."""
assert INTERCEPT.size == INTERCEPT_SIZE and INTERCEPT_LEAN.size == Offset.RAX + 8

COMPLETION_STRUCT: Final = struct.Struct("<I4BQ" "IBBH" "QQQQQ" "HBBI")  # fmt: skip
"""The completion: header bytes, partition, VpIndex, Version, Status, Registers, RIP, RAX, RCX,
RSI, RDI, PortNumber, AccessInfo, reserved, Detail."""
COMPLETION_SIZE: Final = COMPLETION_STRUCT.size
COMPLETION_PAYLOAD: Final = COMPLETION_SIZE - HEADER_SIZE

ANNOUNCEMENT_HEAD: Final = struct.Struct("<I4BQ" "BBHI")  # fmt: skip
"""The announcement's fixed part: header bytes, partition, Version, Flags, EntryCount, FirstIndex."""
ANNOUNCEMENT_ENTRY: Final = struct.Struct("<HHBxxx")
"""One announced port range: first port, last port, access (1 read, 2 write, 3 both)."""

REGION_STRUCT: Final = struct.Struct("<I4BQBBHIQQQ")
"""The memory region frame: header bytes, partition, Version, Flags, reserved, GuestPhysical,
Size, FdOffset."""

CONTROL_REQUEST_STRUCT: Final = struct.Struct("<I4BQ" "BBBxI")  # fmt: skip
"""A control request (a tool to the service, first frame of its connection): header bytes, partition
(the VM asked about), Version, Request, Flags, reserved, RequestId."""
CONTROL_REPLY_HEAD: Final = struct.Struct("<I4BQ" "BBBxII")  # fmt: skip
"""A control reply's fixed part: header bytes, partition, Version, Flags, Status, reserved, RequestId,
Offset; the document's bytes follow (PayloadSize - 12 of them)."""

HELLO_STRUCT: Final = struct.Struct("<I4BQ" "HHI")  # fmt: skip
"""HELLO (the VMM's first frame on a connection): header bytes, partition (the VM), Major, Minor,
Capabilities."""
HELLO_REPLY_HEAD: Final = struct.Struct("<I4BQ" "HHI" "BxH")  # fmt: skip
"""HELLO_REPLY's fixed part: header bytes, partition (the VM), Major, Minor, Capabilities, Status,
reserved, ReasonLength; the reason's UTF-8 bytes follow."""

LIFECYCLE_HEAD: Final = struct.Struct("<I4BQ" "BBBxII")  # fmt: skip
"""A lifecycle request's or reply's fixed part: header bytes, partition (the VM), Version, Verb (request)
or Status (reply), Flags, reserved, RequestId, Offset; the document's bytes follow (PayloadSize - 12)."""

# Every AccessInfo byte the codec accepts: a size of 1, 2 or 4 and no REP
# without StringOp. Bits 5-7 are reserved and therefore ignored.
VALID_ACCESS_INFO: Final = tuple((b & 7) in (1, 2, 4) and not (b & 0x10 and not b & 0x08) for b in range(256))


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
        return pack_completion(
            self.source_partition,
            self.vp_index,
            self.status,
            self.registers,
            self.rip,
            self.rax,
            self.rcx,
            self.rsi,
            self.rdi,
            self.port_number,
            self.access_info,
            self.detail,
            version=self.version,
        )


def pack_completion(
    partition: int,
    vp_index: int,
    status: int,
    registers: int,
    rip: int,
    rax: int,
    rcx: int = 0,
    rsi: int = 0,
    rdi: int = 0,
    port: int = 0,
    access_info: int = 0,
    detail: int = 0,
    *,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    """The completion frame's bytes. Hot paths bind this once (it is plain positional arguments)."""
    return COMPLETION_STRUCT.pack(
        COMPLETION,
        COMPLETION_PAYLOAD,
        0,
        0,
        0,
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
        0,
        detail,
    )


pack_completion_body: Final = functools.partial(COMPLETION_STRUCT.pack, COMPLETION, COMPLETION_PAYLOAD, 0, 0, 0)
"""The hot path's packer, C all the way: the completion's fields from the partition on, in layout
order (partition, VpIndex, Version, Status, Registers, RIP, RAX, RCX, RSI, RDI, PortNumber,
AccessInfo, reserved, Detail). Everything else uses :func:`pack_completion`."""


def message_type(data: bytes | bytearray | memoryview) -> int:
    """The MessageType of a frame, or 0 if it is too short to have one."""
    return HEADER.unpack_from(data)[0] if len(data) >= HEADER_SIZE else 0


def payload_size(data: bytes | bytearray | memoryview, at: int = 0) -> tuple[int, int]:
    """The header rule: (PayloadSize, its offset) of the header at ``data[at:]``, in either spelling."""
    if not data[at + 4] and not data[at + 5] and not data[at + 6] and data[at + 7]:
        return data[at + 7], Offset.SEED_PAYLOAD_SIZE
    return data[at + 4], Offset.PAYLOAD_SIZE


def document_chunks(document: bytes, size: int) -> Iterator[tuple[int, bytes, bool]]:
    """A document split for frames that carry at most ``size`` bytes of it: (offset, chunk, final) for each.

    An empty document is one empty, final chunk: every reply has at least one frame.
    """
    for start in range(0, max(len(document), 1), size):
        yield start, document[start : start + size], start + size >= len(document)


def frame_ids(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(source partition, VpIndex) of a frame, as far as its bytes go (UNKNOWN_VP when cut short)."""
    if len(data) >= Offset.VP_INDEX + 4:
        ids: tuple[int, int] = IDS.unpack_from(data, Offset.PARTITION)
        return ids
    partition = int.from_bytes(data[Offset.PARTITION : Offset.VP_INDEX], "little") if len(data) >= 16 else 0
    return partition, UNKNOWN_VP


def check_header(data: bytes | bytearray | memoryview, known: frozenset[int]) -> int:
    """Validate a frame's header and length; return its payload size.

    Raises a :class:`~dispatcher.FrameError` for a short frame, a type not in
    ``known`` or a PayloadSize out of range; an I/O port intercept also needs
    the fixed part of its layout.
    """
    n = len(data)
    if n < HEADER_SIZE:
        raise ShortFrameError(
            f"frame is {n} bytes, a message header needs {HEADER_SIZE}", field="message_header", offset=n, value=None
        )
    kind = HEADER.unpack_from(data)[0]
    if kind not in known:
        raise UnknownMessageTypeError(
            "not a message type this project reads", field="message_type", offset=0, value=kind
        )
    size, offset = payload_size(data)
    if size > MAX_PAYLOAD:
        raise FieldValueError(
            f"more than the {MAX_PAYLOAD} payload bytes of a message slot",
            field="payload_size",
            offset=offset,
            value=size,
        )
    name, least = _FIXED_PAYLOAD.get(kind, ("a frame", 0))
    if size < least:
        raise FieldValueError(f"{name} needs {least} payload bytes", field="payload_size", offset=offset, value=size)
    end = HEADER_SIZE + size
    if n < end:
        raise ShortFrameError(f"frame is {n} bytes, its header promises {end}", field="payload", offset=n, value=None)
    if n > SLOT_SIZE:
        raise FieldValueError(
            f"frame is longer than a {SLOT_SIZE}-byte message slot", field="frame_length", offset=SLOT_SIZE, value=n
        )
    return size


def check_io_payload(access_type: int, access_info: int, instruction_byte_count: int) -> None:
    """Validate the I/O port intercept's fields that have forbidden values."""
    if access_type > 1:
        raise FieldValueError(
            "access type is neither read (0) nor write (1)",
            field="access_type",
            offset=Offset.ACCESS_TYPE,
            value=access_type,
        )
    if (access_info & 7) not in (1, 2, 4):
        raise FieldValueError(
            "access size is not 1, 2 or 4 bytes",
            field="access_info.access_size",
            offset=Offset.ACCESS_INFO,
            value=access_info & 7,
        )
    if access_info & 0x10 and not access_info & 0x08:
        raise FieldValueError(
            "a REP prefix without StringOp",
            field="access_info.rep_prefix",
            offset=Offset.ACCESS_INFO,
            value=access_info,
        )
    if instruction_byte_count > 16:
        raise FieldValueError(
            "more than 16 instruction bytes",
            field="instruction_byte_count",
            offset=Offset.INSTRUCTION_BYTE_COUNT,
            value=instruction_byte_count,
        )


def check_intercept(frame: bytes | bytearray | memoryview) -> None:
    """Validate an I/O port intercept frame; raise the first :class:`~dispatcher.FrameError` it earns."""
    check_header(frame, _INTERCEPT_ONLY)
    check_io_payload(frame[Offset.ACCESS_TYPE], frame[Offset.ACCESS_INFO], frame[Offset.INSTRUCTION_BYTE_COUNT])


# Per message type: its name in errors, and the payload bytes of its fixed part.
_FIXED_PAYLOAD: Final = {
    IO_PORT_INTERCEPT: ("an I/O port intercept", IO_PORT_PAYLOAD_SIZE),
    COMPLETION: ("a completion", COMPLETION_PAYLOAD),
    ANNOUNCEMENT: ("an announcement", ANNOUNCEMENT_HEAD.size - HEADER_SIZE),
    REGION: ("a region frame", REGION_STRUCT.size - HEADER_SIZE),
    CONTROL_REQUEST: ("a control request", CONTROL_REQUEST_STRUCT.size - HEADER_SIZE),
    CONTROL_REPLY: ("a control reply", CONTROL_REPLY_HEAD.size - HEADER_SIZE),
    HELLO: ("a HELLO", HELLO_STRUCT.size - HEADER_SIZE),
    HELLO_REPLY: ("a HELLO_REPLY", HELLO_REPLY_HEAD.size - HEADER_SIZE),
    LIFECYCLE_REQUEST: ("a lifecycle request", LIFECYCLE_HEAD.size - HEADER_SIZE),
    LIFECYCLE_REPLY: ("a lifecycle reply", LIFECYCLE_HEAD.size - HEADER_SIZE),
}
_INTERCEPT_ONLY: Final = frozenset({IO_PORT_INTERCEPT})
_COMPLETION_ONLY: Final = frozenset({COMPLETION})


def decode_completion(data: bytes | bytearray | memoryview) -> Completion:
    """Parse one completion frame; raise a :class:`~dispatcher.FrameError` naming what is wrong."""
    check_header(data, _COMPLETION_ONLY)
    (*_, partition, vp_index, version, status, registers, rip, rax, rcx, rsi, rdi, port, access_info, _, detail) = (
        COMPLETION_STRUCT.unpack_from(data)
    )
    if version != PROTOCOL_VERSION:
        raise FieldValueError(
            f"this side speaks protocol version {PROTOCOL_VERSION}",
            field="version",
            offset=Offset.COMPLETION_VERSION,
            value=version,
        )
    try:
        known_status = Status(status)
    except ValueError:
        raise FieldValueError(
            "not a status this version defines", field="status", offset=Offset.COMPLETION_STATUS, value=status
        ) from None
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
