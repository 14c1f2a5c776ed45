"""The I/O port intercept message: decode and encode one frame.

Layout (little-endian, packed) as in the Hyper-V ABI: a 16-byte message
header, then the intercept header and the I/O port payload. The header is
read in both spellings: the ABI's (PayloadSize at byte 4, MessageFlags at
byte 5) and the seed page's drawing (bytes 4-6 zero, PayloadSize at byte 7).
It is always written in the ABI's.

Reserved bits and bytes are not checked on input, because a newer
hypervisor may give them a meaning; they are kept, so ``to_bytes()`` of a
decoded ABI frame gives back the same bytes. Messages built here carry
them as zero.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import FieldValueError, ShortFrameError, UnknownMessageTypeError
from .fields import AccessInfo, AccessType, ExecutionState, SegmentAttributes, SegmentRegister

__all__ = [
    "HEADER_SIZE",
    "IO_PORT_INTERCEPT",
    "IO_PORT_PAYLOAD_SIZE",
    "MAX_PAYLOAD",
    "SLOT_SIZE",
    "IoPortInterceptMessage",
    "check_header",
    "decode_message",
]

IO_PORT_INTERCEPT = 0x8001_0000
HEADER_SIZE = 16
MAX_PAYLOAD = 240
SLOT_SIZE = HEADER_SIZE + MAX_PAYLOAD
IO_PORT_PAYLOAD_SIZE = 128
_FRAME_SIZE = HEADER_SIZE + IO_PORT_PAYLOAD_SIZE

HEADER = struct.Struct("<I4BQ")
_SEGMENT = "QIHH"
_BODY = struct.Struct("<I4BQ" "IBBH" + _SEGMENT + "QQ" "HBBI" "Q" "16s" + _SEGMENT + _SEGMENT + "QQQ")  # fmt: skip
assert _BODY.size == _FRAME_SIZE

# Every AccessInfo byte the codec accepts: a size of 1, 2 or 4 and no REP
# without StringOp. Bits 5-7 are reserved and therefore ignored.
VALID_ACCESS_INFO = tuple((b & 7) in (1, 2, 4) and not (b & 0x10 and not b & 0x08) for b in range(256))


def check_header(data: bytes | bytearray | memoryview, message_type: int, known: frozenset[int]) -> int:
    """Validate a frame's header and length; return its payload size.

    Raises the codec's errors for a short frame, an unknown type or a
    PayloadSize out of range. ``known`` maps no further: any message type in
    it is accepted, and the I/O port intercept also needs 128 payload bytes.
    """
    n = len(data)
    if n < HEADER_SIZE:
        raise ShortFrameError(
            f"frame is {n} bytes, a message header needs {HEADER_SIZE}",
            field="message_header",
            offset=n,
            value=None,
        )
    _, b4, b5, b6, b7, _ = HEADER.unpack_from(data)
    if message_type not in known:
        raise UnknownMessageTypeError(
            "not a message type this project reads", field="message_type", offset=0, value=message_type
        )
    payload_size, offset = b4, 4
    if b4 == 0 and b5 == 0 and b6 == 0 and b7 != 0:
        payload_size, offset = b7, 7  # the seed page's drawing
    if payload_size > MAX_PAYLOAD:
        raise FieldValueError(
            f"more than the {MAX_PAYLOAD} payload bytes of a message slot",
            field="payload_size",
            offset=offset,
            value=payload_size,
        )
    if message_type == IO_PORT_INTERCEPT and payload_size < IO_PORT_PAYLOAD_SIZE:
        raise FieldValueError(
            f"an I/O port intercept needs {IO_PORT_PAYLOAD_SIZE} payload bytes",
            field="payload_size",
            offset=offset,
            value=payload_size,
        )
    end = HEADER_SIZE + payload_size
    if n < end:
        raise ShortFrameError(
            f"frame is {n} bytes, its header promises {end}",
            field="payload",
            offset=n,
            value=None,
        )
    if n > SLOT_SIZE:
        raise FieldValueError(
            f"frame is longer than a {SLOT_SIZE}-byte message slot",
            field="frame_length",
            offset=SLOT_SIZE,
            value=n,
        )
    return int(payload_size)


def check_io_payload(access_type: int, access_info: int, instruction_byte_count: int) -> None:
    """Validate the I/O port fields that have forbidden values."""
    if access_type > AccessType.WRITE:
        raise FieldValueError(
            "access type is neither read (0) nor write (1)", field="access_type", offset=21, value=access_type
        )
    if (access_info & 7) not in (1, 2, 4):
        raise FieldValueError(
            "access size is not 1, 2 or 4 bytes", field="access_info.access_size", offset=58, value=access_info & 7
        )
    if access_info & 0x10 and not access_info & 0x08:
        raise FieldValueError(
            "a REP prefix without StringOp", field="access_info.rep_prefix", offset=58, value=access_info
        )
    if instruction_byte_count > 16:
        raise FieldValueError(
            "more than 16 instruction bytes",
            field="instruction_byte_count",
            offset=59,
            value=instruction_byte_count,
        )


_KNOWN = frozenset({IO_PORT_INTERCEPT})


@dataclass(frozen=True, slots=True)
class IoPortInterceptMessage:
    """HV_X64_IO_PORT_INTERCEPT_MESSAGE, field by field.

    Build one from keyword arguments to synthesize an intercept, or get one
    from :func:`decode_message`. ``instruction_bytes`` is the field as carried
    (always 16 bytes, zero-padded); its first ``instruction_byte_count`` bytes
    are valid, and the count defaults to the length given. Payload bytes
    past the 128 this message defines are ignored on input.
    """

    port_number: int = 0
    access_type: AccessType = AccessType.READ
    access_info: AccessInfo = AccessInfo(1)
    rax: int = 0
    vp_index: int = 0
    source_partition: int = 0
    instruction_length: int = 1
    cr8: int = 0
    execution_state: ExecutionState = ExecutionState(0)
    cs_segment: SegmentRegister = SegmentRegister(attributes=SegmentAttributes(0x9B))
    rip: int = 0
    rflags: int = 0x2
    instruction_byte_count: int | None = None
    instruction_bytes: bytes = b""
    ds_segment: SegmentRegister = SegmentRegister()
    es_segment: SegmentRegister = SegmentRegister()
    rcx: int = 0
    rsi: int = 0
    rdi: int = 0
    message_type: int = IO_PORT_INTERCEPT
    payload_size: int = IO_PORT_PAYLOAD_SIZE
    message_flags: int = 0
    reserved_header: int = 0
    reserved_payload: int = 0

    def __post_init__(self) -> None:
        if self.instruction_byte_count is None:
            object.__setattr__(self, "instruction_byte_count", len(self.instruction_bytes))
        if not isinstance(self.access_info, AccessInfo):
            object.__setattr__(self, "access_info", AccessInfo(self.access_info))
        if not isinstance(self.execution_state, ExecutionState):
            object.__setattr__(self, "execution_state", ExecutionState(self.execution_state))
        if not isinstance(self.access_type, AccessType):
            object.__setattr__(self, "access_type", AccessType(self.access_type))
        if len(self.instruction_bytes) > 16 or not 0 <= (self.instruction_byte_count or 0) <= 16:
            raise ValueError("instruction_bytes holds at most 16 bytes")
        object.__setattr__(self, "instruction_bytes", bytes(self.instruction_bytes).ljust(16, b"\0"))
        if not 0 <= self.instruction_length <= 15 or not 0 <= self.cr8 <= 15:
            raise ValueError("instruction_length and cr8 are 4-bit fields")
        if not IO_PORT_PAYLOAD_SIZE <= self.payload_size <= MAX_PAYLOAD:
            raise ValueError(f"payload_size must be {IO_PORT_PAYLOAD_SIZE}..{MAX_PAYLOAD}")

    @property
    def is_write(self) -> bool:
        return self.access_type == AccessType.WRITE

    def to_bytes(self) -> bytes:
        """Encode in the ABI layout, padded to ``16 + payload_size`` bytes."""
        cs, ds, es = self.cs_segment, self.ds_segment, self.es_segment
        body = _BODY.pack(
            self.message_type,
            self.payload_size,
            self.message_flags,
            self.reserved_header & 0xFF,
            self.reserved_header >> 8,
            self.source_partition,
            self.vp_index,
            self.instruction_length | self.cr8 << 4,
            self.access_type,
            self.execution_state,
            cs.base,
            cs.limit,
            cs.selector,
            cs.attributes,
            self.rip,
            self.rflags,
            self.port_number,
            self.access_info,
            self.instruction_byte_count,
            self.reserved_payload,
            self.rax,
            self.instruction_bytes,
            ds.base,
            ds.limit,
            ds.selector,
            ds.attributes,
            es.base,
            es.limit,
            es.selector,
            es.attributes,
            self.rcx,
            self.rsi,
            self.rdi,
        )
        return body + bytes(HEADER_SIZE + self.payload_size - _FRAME_SIZE)


def decode_message(data: bytes | bytearray | memoryview) -> IoPortInterceptMessage:
    """Parse one frame into an :class:`IoPortInterceptMessage`.

    ``data`` is exactly one frame (16 + PayloadSize bytes) or a whole 256-byte
    message slot. Raises a :class:`~dispatcher.errors.FrameError` subclass that
    names the field, its offset and the value.
    """
    message_type = HEADER.unpack_from(data)[0] if len(data) >= HEADER_SIZE else 0
    payload_size = check_header(data, message_type, _KNOWN)
    (
        _,
        b4,
        flags,
        b6,
        b7,
        partition,
        vp_index,
        length_cr8,
        access_type,
        state,
        cs_base,
        cs_limit,
        cs_selector,
        cs_attributes,
        rip,
        rflags,
        port,
        access_info,
        byte_count,
        reserved_payload,
        rax,
        instruction_bytes,
        ds_base,
        ds_limit,
        ds_selector,
        ds_attributes,
        es_base,
        es_limit,
        es_selector,
        es_attributes,
        rcx,
        rsi,
        rdi,
    ) = _BODY.unpack_from(data)
    check_io_payload(access_type, access_info, byte_count)
    seed_layout = b4 == 0 and flags == 0 and b6 == 0
    return IoPortInterceptMessage(
        message_type=message_type,
        payload_size=payload_size,
        message_flags=flags,
        reserved_header=0 if seed_layout else b6 | b7 << 8,
        source_partition=partition,
        vp_index=vp_index,
        instruction_length=length_cr8 & 0xF,
        cr8=length_cr8 >> 4,
        access_type=AccessType(access_type),
        execution_state=ExecutionState(state),
        cs_segment=SegmentRegister(cs_base, cs_limit, cs_selector, SegmentAttributes(cs_attributes)),
        rip=rip,
        rflags=rflags,
        port_number=port,
        access_info=AccessInfo(access_info),
        instruction_byte_count=byte_count,
        reserved_payload=reserved_payload,
        rax=rax,
        instruction_bytes=instruction_bytes,
        ds_segment=SegmentRegister(ds_base, ds_limit, ds_selector, SegmentAttributes(ds_attributes)),
        es_segment=SegmentRegister(es_base, es_limit, es_selector, SegmentAttributes(es_attributes)),
        rcx=rcx,
        rsi=rsi,
        rdi=rdi,
    )
