"""The opening exchange: the VMM's HELLO and the service's HELLO_REPLY, sans-I/O.

Every VMM connection opens with one HELLO from the VMM: the session
version it speaks, what it can do, and, in the header's SourcePartition,
the VM it is. The service answers with one HELLO_REPLY: its own version
and capabilities and a status. After ACCEPTED the service sends its port
announcement and the connection carries intercepts, every one of them
from that VM's partition; after any other status the service closes the
connection, and the reason says why. docs/PROTOCOL.md has the byte tables.

::

    frame = encode_hello(Hello(vm=3, capabilities=Capability.GUEST_MEMORY))
    hello = decode_hello(frame)                 # FrameError if malformed
    refusal = version_refusal(hello)            # None when the majors agree
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from .errors import FieldValueError
from .wire import (
    HEADER_SIZE,
    HELLO,
    HELLO_REPLY,
    HELLO_REPLY_HEAD,
    HELLO_STRUCT,
    MAX_PAYLOAD,
    SESSION_MAJOR,
    SESSION_MINOR,
    Offset,
    check_header,
)

__all__ = [
    "MAX_REASON",
    "Capability",
    "Hello",
    "HelloReply",
    "HelloStatus",
    "decode_hello",
    "decode_hello_reply",
    "encode_hello",
    "encode_hello_reply",
    "version_refusal",
    "version_text",
]

MAX_REASON: Final = MAX_PAYLOAD - (HELLO_REPLY_HEAD.size - HEADER_SIZE)
"""The most UTF-8 bytes of reason one HELLO_REPLY carries: 228 (a longer one is cut at a character)."""

_HELLO_PAYLOAD: Final = HELLO_STRUCT.size - HEADER_SIZE
_REPLY_FIXED: Final = HELLO_REPLY_HEAD.size - HEADER_SIZE
_HELLO_ONLY: Final = frozenset({HELLO})
_REPLY_ONLY: Final = frozenset({HELLO_REPLY})


class HelloStatus(enum.IntEnum):
    """How the service answers a HELLO. Anything but ACCEPTED is followed by the service closing."""

    ACCEPTED = 0
    """The connection is the VM's: the port announcement follows."""
    INCOMPATIBLE_VERSION = 1
    """The HELLO's major version is not the service's; the reason names both versions."""
    REFUSED = 2
    """A limit or a policy refuses this connection (or its opening was malformed); the reason says which."""
    NO_WORKER = 3
    """The VM's worker process could not be started."""


class Capability(enum.IntFlag):
    """Capability bits of HELLO (what the VMM may do) and HELLO_REPLY (what the service accepts).

    Bits this version does not define are kept as received and otherwise
    ignored: a later minor version may define them.
    """

    NONE = 0
    GUEST_MEMORY = 1
    """HELLO: the VMM may share guest memory regions. HELLO_REPLY: the service accepts them."""
    LIFECYCLE = 2
    """HELLO: the VMM may send lifecycle requests. HELLO_REPLY: the service answers them (dispatcher.lifecycle)."""


def version_text(major: int, minor: int) -> str:
    """A session version as people write it: ``1.0``."""
    return f"{major}.{minor}"


def _check_range(name: str, value: int, bits: int) -> None:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{name} must be within 0..{(1 << bits) - 1:#x} ({bits} bits), not {value}")


def _check_session(frame: Hello | HelloReply) -> None:
    # The fields both opening frames carry: each within its width, capabilities as flags.
    _check_range("vm", frame.vm, 64)
    _check_range("major", frame.major, 16)
    _check_range("minor", frame.minor, 16)
    _check_range("capabilities", frame.capabilities, 32)
    if not isinstance(frame.capabilities, Capability):
        object.__setattr__(frame, "capabilities", Capability(frame.capabilities))


@dataclass(frozen=True, slots=True)
class Hello:
    """The VMM's opening frame: ``vm`` (the header's SourcePartition), its session version and capabilities."""

    vm: int
    major: int = SESSION_MAJOR
    minor: int = SESSION_MINOR
    capabilities: Capability = Capability.NONE

    def __post_init__(self) -> None:
        _check_session(self)


@dataclass(frozen=True, slots=True)
class HelloReply:
    """The service's answer to a HELLO: its version and capabilities, a status and, unless accepted, why."""

    vm: int
    major: int = SESSION_MAJOR
    minor: int = SESSION_MINOR
    capabilities: Capability = Capability.NONE
    status: HelloStatus = HelloStatus.ACCEPTED
    reason: str = ""

    def __post_init__(self) -> None:
        _check_session(self)
        if not isinstance(self.status, HelloStatus):
            object.__setattr__(self, "status", HelloStatus(self.status))

    @property
    def accepted(self) -> bool:
        """True when the status is ACCEPTED."""
        return self.status is HelloStatus.ACCEPTED


def encode_hello(hello: Hello) -> bytes:
    """The HELLO frame's bytes (24)."""
    return HELLO_STRUCT.pack(
        HELLO, _HELLO_PAYLOAD, 0, 0, 0, hello.vm, hello.major, hello.minor, int(hello.capabilities)
    )


def encode_hello_reply(reply: HelloReply) -> bytes:
    """The HELLO_REPLY frame's bytes; a reason over :data:`MAX_REASON` UTF-8 bytes is cut at a character."""
    reason = reply.reason.encode()
    if len(reason) > MAX_REASON:
        # Cut where a whole character ends: the decoder refuses a broken one.
        reason = reason[:MAX_REASON].decode(errors="ignore").encode()
    head = HELLO_REPLY_HEAD.pack(
        HELLO_REPLY,
        _REPLY_FIXED + len(reason),
        0,
        0,
        0,
        reply.vm,
        reply.major,
        reply.minor,
        int(reply.capabilities),
        reply.status,
        len(reason),
    )
    return head + reason


def decode_hello(frame: bytes | bytearray | memoryview) -> Hello:
    """Parse a HELLO frame; raise a :class:`~dispatcher.FrameError` naming the field and its offset.

    Payload bytes past the eight this version defines are ignored (a later
    minor version may add fields). The version is not checked here: see
    :func:`version_refusal`.
    """
    check_header(frame, _HELLO_ONLY)
    *_, vm, major, minor, capabilities = HELLO_STRUCT.unpack_from(frame)
    return Hello(vm, major, minor, Capability(capabilities))


def decode_hello_reply(frame: bytes | bytearray | memoryview) -> HelloReply:
    """Parse a HELLO_REPLY frame; raise a :class:`~dispatcher.FrameError` naming the field and its offset."""
    size = check_header(frame, _REPLY_ONLY)
    *_, vm, major, minor, capabilities, status, length = HELLO_REPLY_HEAD.unpack_from(frame)
    try:
        known = HelloStatus(status)
    except ValueError:
        raise FieldValueError(
            "not a HELLO_REPLY status this version defines (0-3)",
            field="status",
            offset=Offset.HELLO_STATUS,
            value=status,
        ) from None
    if _REPLY_FIXED + length > size:
        raise FieldValueError(
            f"a reason of {length} bytes needs a PayloadSize of {_REPLY_FIXED + length}, the frame has {size}",
            field="reason_length",
            offset=Offset.HELLO_REASON_LENGTH,
            value=length,
        )
    text = bytes(frame[Offset.HELLO_REASON : Offset.HELLO_REASON + length])
    try:
        reason = text.decode()
    except UnicodeDecodeError as error:
        raise FieldValueError(
            "the reason is not UTF-8",
            field="reason",
            offset=Offset.HELLO_REASON + error.start,
            value=text[error.start],
        ) from None
    return HelloReply(vm, major, minor, Capability(capabilities), known, reason)


def version_refusal(hello: Hello, *, capabilities: Capability = Capability.NONE) -> HelloReply | None:
    """The INCOMPATIBLE_VERSION reply (naming both versions) a HELLO of another major earns; None if it speaks ours."""
    if hello.major == SESSION_MAJOR:
        return None
    theirs, ours = version_text(hello.major, hello.minor), version_text(SESSION_MAJOR, SESSION_MINOR)
    return HelloReply(
        hello.vm,
        capabilities=capabilities,
        status=HelloStatus.INCOMPATIBLE_VERSION,
        reason=f"the VMM speaks session version {theirs}, this service {ours} (the major versions must match)",
    )
