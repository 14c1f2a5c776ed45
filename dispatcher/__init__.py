"""intercept-dispatch: device models for I/O port intercepts.

Write handlers with :func:`on_port` or :meth:`Router.on_port`, serve them with
a :class:`Dispatcher` over any :class:`Transport`, and test them with
:mod:`dispatcher.testing`.
"""

from .announce import ANNOUNCEMENT, PortRange, decode_announcement, encode_announcement
from .completion import COMPLETION, PROTOCOL_VERSION, UNKNOWN_VP, Completion, Registers, Status, decode_completion
from .engine import Engine, EngineStats, Job, Step
from .errors import (
    DispatchError,
    FieldValueError,
    FrameError,
    GuestMemoryError,
    OverlappingClaimError,
    RoutingError,
    ShortFrameError,
    TransportClosedError,
    TransportError,
    UnknownMessageTypeError,
)
from .fields import AccessInfo, AccessType, ExecutionState, SegmentAttributes, SegmentRegister
from .guest import Guest, SegmentSource, Translate, identity_translation
from .guest_memory import BufferMemory, GuestMemory, MemoryFault, MemoryRegion
from .irq import NO_RECEIVER, IrqEvent, IrqLine, IrqReceiver, IrqRecorder
from .loop import Dispatcher
from .message import IO_PORT_INTERCEPT, IoPortInterceptMessage, decode_message
from .router import Access, BulkAccess, BulkClaim, BulkHandler, Claim, Handler, PortAccess, Router, on_bulk, on_port
from .string_decode import Segment, StringInstruction, decode_string_instruction
from .string_io import DEFAULT_MAX_ELEMENTS, UnsupportedReason
from .transport import Transport

__all__ = [
    "ANNOUNCEMENT",
    "COMPLETION",
    "DEFAULT_MAX_ELEMENTS",
    "IO_PORT_INTERCEPT",
    "NO_RECEIVER",
    "PROTOCOL_VERSION",
    "UNKNOWN_VP",
    "Access",
    "AccessInfo",
    "AccessType",
    "BufferMemory",
    "BulkAccess",
    "BulkClaim",
    "BulkHandler",
    "Claim",
    "Completion",
    "DispatchError",
    "Dispatcher",
    "Engine",
    "EngineStats",
    "ExecutionState",
    "FieldValueError",
    "FrameError",
    "Guest",
    "GuestMemory",
    "GuestMemoryError",
    "Handler",
    "IoPortInterceptMessage",
    "IrqEvent",
    "IrqLine",
    "IrqReceiver",
    "IrqRecorder",
    "Job",
    "MemoryFault",
    "MemoryRegion",
    "OverlappingClaimError",
    "PortAccess",
    "PortRange",
    "Registers",
    "Router",
    "RoutingError",
    "Segment",
    "SegmentAttributes",
    "SegmentRegister",
    "SegmentSource",
    "ShortFrameError",
    "Status",
    "Step",
    "StringInstruction",
    "Translate",
    "Transport",
    "TransportClosedError",
    "TransportError",
    "UnknownMessageTypeError",
    "UnsupportedReason",
    "decode_announcement",
    "decode_completion",
    "decode_message",
    "decode_string_instruction",
    "encode_announcement",
    "identity_translation",
    "on_bulk",
    "on_port",
]
