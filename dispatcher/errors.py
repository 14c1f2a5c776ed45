"""The project's exception family: one root, a few meaningful branches."""

from __future__ import annotations

__all__ = [
    "AccessRefused",
    "DispatchError",
    "FieldValueError",
    "FrameError",
    "GuestMemoryError",
    "IncompatibleVersionError",
    "OverlappingClaimError",
    "RoutingError",
    "SessionRefusedError",
    "ShortFrameError",
    "StateError",
    "TransportClosedError",
    "TransportError",
    "UnknownMessageTypeError",
]


class DispatchError(Exception):
    """Root of every error this project raises on purpose."""


class FrameError(DispatchError):
    """A frame's bytes do not form a valid message.

    ``field``, ``offset`` and ``value`` name what was wrong: the field's name,
    its byte offset in the frame and the value found there (``None`` when the
    bytes were missing).
    """

    def __init__(self, reason: str, *, field: str, offset: int, value: int | None) -> None:
        shown = "missing" if value is None else hex(value)
        super().__init__(f"{field} at offset {offset} = {shown}: {reason}")
        self.reason = reason
        self.field = field
        self.offset = offset
        self.value = value


class ShortFrameError(FrameError):
    """The frame ends before the bytes its header promises."""


class UnknownMessageTypeError(FrameError):
    """The MessageType is not one this project reads."""


class FieldValueError(FrameError):
    """A field holds a value its definition forbids."""


class RoutingError(DispatchError):
    """A port claim cannot be installed or removed."""


class OverlappingClaimError(RoutingError):
    """A claim overlaps a port already claimed for the same direction."""


class TransportError(DispatchError):
    """A transport failed to carry frames."""


class TransportClosedError(TransportError):
    """The other end of the transport has gone away."""


class GuestMemoryError(DispatchError):
    """A guest-physical access that no region backs (or a write to a read-only one); nothing was touched."""

    def __init__(self, reason: str, *, address: int, length: int) -> None:
        super().__init__(f"guest-physical {address:#x}+{length:#x}: {reason}")
        self.address = address
        self.length = length


class AccessRefused(DispatchError):
    """An intercept no handler may run for: the VP gets ``status`` (a :class:`~dispatcher.Status`)
    with ``detail``, and nothing moves. Raised by string I/O planning (instruction bytes that
    contradict the frame, memory the guest cannot reach, a hook that is missing)."""

    def __init__(self, reason: str, *, status: int, detail: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.detail = detail


class SessionRefusedError(DispatchError):
    """The service answered a VMM's HELLO with a refusal and closed the connection.

    ``status`` is the HELLO_REPLY's status (a :class:`~dispatcher.hello.HelloStatus`),
    ``reason`` the text the service gave, ``vm`` the VM the HELLO named.
    """

    def __init__(self, message: str, *, status: int, reason: str, vm: int) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.vm = vm


class IncompatibleVersionError(DispatchError):
    """The two ends of a connection speak session versions with different majors.

    ``ours`` and ``theirs`` are the (major, minor) versions of this side and
    of the peer.
    """

    def __init__(self, message: str, *, ours: tuple[int, int], theirs: tuple[int, int]) -> None:
        super().__init__(message)
        self.ours = ours
        self.theirs = theirs


class StateError(DispatchError):
    """Saved device state that cannot be restored (or a state file that cannot be read).

    ``device`` names the device (its id in a state document, or the file),
    ``field`` the field of its state (a dotted path, or a line and column of
    a file) and ``reason`` what is wrong with it. Nothing was changed.
    """

    def __init__(self, reason: str, *, device: str, field: str) -> None:
        super().__init__(f"{device}: {field}: {reason}")
        self.reason = reason
        self.device = device
        self.field = field
