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
    OverlappingClaimError,
    RoutingError,
    ShortFrameError,
    TransportClosedError,
    TransportError,
    UnknownMessageTypeError,
)
from .fields import AccessInfo, AccessType, ExecutionState, SegmentAttributes, SegmentRegister
from .irq import NO_RECEIVER, IrqEvent, IrqLine, IrqReceiver, IrqRecorder
from .loop import Dispatcher
from .message import IO_PORT_INTERCEPT, IoPortInterceptMessage, decode_message
from .router import Access, Claim, Handler, PortAccess, Router, on_port
from .transport import Transport

__all__ = [
    "ANNOUNCEMENT",
    "COMPLETION",
    "IO_PORT_INTERCEPT",
    "NO_RECEIVER",
    "PROTOCOL_VERSION",
    "UNKNOWN_VP",
    "Access",
    "AccessInfo",
    "AccessType",
    "Claim",
    "Completion",
    "DispatchError",
    "Dispatcher",
    "Engine",
    "EngineStats",
    "ExecutionState",
    "FieldValueError",
    "FrameError",
    "Handler",
    "IoPortInterceptMessage",
    "IrqEvent",
    "IrqLine",
    "IrqReceiver",
    "IrqRecorder",
    "Job",
    "OverlappingClaimError",
    "PortAccess",
    "PortRange",
    "Registers",
    "Router",
    "RoutingError",
    "SegmentAttributes",
    "SegmentRegister",
    "ShortFrameError",
    "Status",
    "Step",
    "Transport",
    "TransportClosedError",
    "TransportError",
    "UnknownMessageTypeError",
    "decode_announcement",
    "decode_completion",
    "decode_message",
    "encode_announcement",
    "on_port",
]
