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

from dataclasses import dataclass

from .fields import AccessInfo, AccessType, ExecutionState, SegmentAttributes, SegmentRegister
from .wire import (
    HEADER_SIZE,
    INTERCEPT,
    INTERCEPT_SIZE,
    IO_PORT_INTERCEPT,
    IO_PORT_PAYLOAD_SIZE,
    MAX_PAYLOAD,
    check_header,
    check_io_payload,
)

__all__ = ["IoPortInterceptMessage", "decode_message"]

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
        body = INTERCEPT.pack(
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
        return body + bytes(HEADER_SIZE + self.payload_size - INTERCEPT_SIZE)


def decode_message(data: bytes | bytearray | memoryview) -> IoPortInterceptMessage:
    """Parse one frame into an :class:`IoPortInterceptMessage`.

    ``data`` is exactly one frame (16 + PayloadSize bytes) or a whole 256-byte
    message slot. Raises a :class:`~dispatcher.errors.FrameError` subclass that
    names the field, its offset and the value.
    """
    payload_size = check_header(data, _KNOWN)
    (
        message_type,
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
    ) = INTERCEPT.unpack_from(data)
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
