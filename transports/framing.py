"""Cutting a byte stream into frames, sans-I/O.

Every frame starts with the 16-byte message header, and its length is
``16 + PayloadSize``: a stream needs no other delimiter. A header whose
PayloadSize cannot be right (over 240) means the stream is out of sync:
nothing after it can be trusted, so the splitter stops there.
"""

from __future__ import annotations

from dispatcher import FieldValueError, FrameError
from dispatcher.wire import HEADER_SIZE, MAX_PAYLOAD, Offset, payload_size

__all__ = ["FrameSplitter"]


class FrameSplitter:
    """Feed it bytes as they arrive; it returns the whole frames among them.

    At most one incomplete frame (under 256 bytes) is held between calls.
    After an undelimitable header, :attr:`error` says why and where, and the
    splitter returns nothing more.
    """

    __slots__ = ("_pending", "error", "offset")

    def __init__(self) -> None:
        self._pending = b""
        self.offset = 0
        """Stream offset of the first byte not yet returned in a frame."""
        self.error: FrameError | None = None
        """Why and where the stream could not be split, once it cannot; None until then."""

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[bytes]:
        """Take the next bytes of the stream; return every frame completed by them."""
        if self.error is not None:
            return []
        if self._pending:
            data = self._pending + data
        n = len(data)
        # The common case, one whole ABI frame per read, costs no copy.
        if (
            n >= HEADER_SIZE
            and n == HEADER_SIZE + data[Offset.PAYLOAD_SIZE]
            and 0 < data[Offset.PAYLOAD_SIZE] <= MAX_PAYLOAD
        ):
            self._pending = b""
            self.offset += n
            return [data]
        frames: list[bytes] = []
        pos = 0
        while n - pos >= HEADER_SIZE:
            size, at = payload_size(data, pos)
            if size > MAX_PAYLOAD:
                self.error = FieldValueError(
                    f"more than the {MAX_PAYLOAD} payload bytes of a message slot: "
                    f"the stream is out of sync at byte {self.offset + pos}",
                    field="payload_size",
                    offset=at,
                    value=size,
                )
                break
            end = pos + HEADER_SIZE + size
            if end > n:
                break
            frames.append(data[pos:end])
            pos = end
        self.offset += pos
        self._pending = b"" if self.error is not None else data[pos:]
        return frames
