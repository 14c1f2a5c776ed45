"""intercept-dispatch: device models for I/O port intercepts.

Write handlers with :func:`on_port` or :meth:`Router.claim`, serve them with
a :class:`Dispatcher` over any :class:`Transport`, and test them with
:mod:`transports.testing`.

Everything here is sans-I/O except :class:`Dispatcher`, the anyio layer,
which is imported (with anyio) only when it is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .allow import AllowEntry, AllowError, AllowIndex, AllowList, load_allow, parse_allow
from .announce import PortRange, decode_announcement, encode_announcement
from .clock import NS_PER_SECOND, ClockError, SteppedClock, Timed, Timer, VirtualClock, Watch, ns_from_seconds
from .device_lock import Acquire, LockedSteps
from .device_state import (
    StateFields,
    StatefulDevice,
    devices_of,
    dump_state,
    load_state,
    owned_by,
    reset_devices,
    restore_device,
    restore_devices,
    save_device,
    save_devices,
)
from .engine import Engine, EngineObserver
from .errors import (
    AccessRefused,
    DispatchError,
    FieldValueError,
    FrameError,
    GuestMemoryError,
    IncompatibleVersionError,
    OverlappingClaimError,
    RoutingError,
    SessionRefusedError,
    ShortFrameError,
    StateError,
    TransportClosedError,
    TransportError,
    UnknownMessageTypeError,
)
from .fields import Access, AccessInfo, AccessType, ExecutionState, SegmentAttributes, SegmentRegister
from .guest import Guest, SegmentSource, Translate, identity_translation
from .guest_memory import BufferMemory, GuestMemory, MemoryFault, MemoryRegion
from .irq import NO_RECEIVER, InterruptController, IrqEvent, IrqLine, IrqReceiver, IrqRecorder, IrqWaitTimeout
from .message import IoPortInterceptMessage, decode_message
from .port_io import Job, Step
from .qemu_log import QemuLogError, read_qemu_log
from .recorder import Recorder
from .replay import Divergence, HandlerFailure, ReplayError, ReplayResult, format_divergence
from .router import BulkAccess, BulkClaim, BulkHandler, Claim, Handler, PortAccess, Router, on_bulk, on_port
from .stats import EngineStats
from .string_plan import DEFAULT_MAX_ELEMENTS, UnsupportedReason
from .trace import Trace, TraceError, TraceReader, TraceWriter, new_metadata, read_trace
from .transport import DecodedAnswer, InlineAnswer, Transport
from .wire import (
    ANNOUNCEMENT,
    COMPLETION,
    IO_PORT_INTERCEPT,
    PROTOCOL_VERSION,
    REGION,
    UNKNOWN_VP,
    Completion,
    Registers,
    Status,
    decode_completion,
    frame_ids,
    message_type,
)
from .x86 import InstructionError, IoInstruction, Segment, decode_io_instruction, encode_io_instruction

if TYPE_CHECKING:
    from .loop import Dispatcher

    __version__: str
    """The installed distribution's version (``importlib.metadata``), "0+unknown" when it is not installed."""

__all__ = [
    "ANNOUNCEMENT",
    "COMPLETION",
    "DEFAULT_MAX_ELEMENTS",
    "IO_PORT_INTERCEPT",
    "NO_RECEIVER",
    "NS_PER_SECOND",
    "PROTOCOL_VERSION",
    "REGION",
    "UNKNOWN_VP",
    "Access",
    "AccessInfo",
    "AccessRefused",
    "AccessType",
    "Acquire",
    "AllowEntry",
    "AllowError",
    "AllowIndex",
    "AllowList",
    "BufferMemory",
    "BulkAccess",
    "BulkClaim",
    "BulkHandler",
    "Claim",
    "ClockError",
    "Completion",
    "DecodedAnswer",
    "DispatchError",
    "Dispatcher",
    "Divergence",
    "Engine",
    "EngineObserver",
    "EngineStats",
    "ExecutionState",
    "FieldValueError",
    "FrameError",
    "Guest",
    "GuestMemory",
    "GuestMemoryError",
    "Handler",
    "HandlerFailure",
    "IncompatibleVersionError",
    "InlineAnswer",
    "InstructionError",
    "InterruptController",
    "IoInstruction",
    "IoPortInterceptMessage",
    "IrqEvent",
    "IrqLine",
    "IrqReceiver",
    "IrqRecorder",
    "IrqWaitTimeout",
    "Job",
    "LockedSteps",
    "MemoryFault",
    "MemoryRegion",
    "OverlappingClaimError",
    "PortAccess",
    "PortRange",
    "QemuLogError",
    "Recorder",
    "Registers",
    "ReplayError",
    "ReplayResult",
    "Router",
    "RoutingError",
    "Segment",
    "SegmentAttributes",
    "SegmentRegister",
    "SegmentSource",
    "SessionRefusedError",
    "ShortFrameError",
    "StateError",
    "StateFields",
    "StatefulDevice",
    "Status",
    "Step",
    "SteppedClock",
    "Timed",
    "Timer",
    "Trace",
    "TraceError",
    "TraceReader",
    "TraceWriter",
    "Translate",
    "Transport",
    "TransportClosedError",
    "TransportError",
    "UnknownMessageTypeError",
    "UnsupportedReason",
    "VirtualClock",
    "Watch",
    "decode_announcement",
    "decode_completion",
    "decode_io_instruction",
    "decode_message",
    "devices_of",
    "dump_state",
    "encode_announcement",
    "encode_io_instruction",
    "format_divergence",
    "frame_ids",
    "identity_translation",
    "load_allow",
    "load_state",
    "message_type",
    "new_metadata",
    "ns_from_seconds",
    "on_bulk",
    "on_port",
    "owned_by",
    "parse_allow",
    "read_qemu_log",
    "read_trace",
    "reset_devices",
    "restore_device",
    "restore_devices",
    "save_device",
    "save_devices",
]


def __getattr__(name: str) -> object:
    # The anyio layer loads on first use, so the sans-I/O core imports without anyio.
    if name == "Dispatcher":
        from .loop import Dispatcher

        return Dispatcher
    # The version too: importlib.metadata takes longer to import than the whole core.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("intercept-dispatch")
        except PackageNotFoundError:
            found = "0+unknown"
        globals()["__version__"] = found
        return found
    raise AttributeError(f"module 'dispatcher' has no attribute {name!r}")
