"""The interface every transport implements: batches of frames in and out, and its declared features."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import ClassVar, TypeAlias

from .guest import Guest

__all__ = ["DecodedAnswer", "InlineAnswer", "Transport"]

InlineAnswer: TypeAlias = Callable[[Sequence[bytes]], list[bytes]]
"""What :meth:`Transport.start_inline` is given: frames received in, the completions ready now out.

It is called from the transport's own thread(s), one batch at a time per
connection, and may block (it runs device code, and it waits while the
dispatcher's bounds are exceeded). The transport sends what it returns at
once, in order, on the calling thread.
"""

DecodedAnswer: TypeAlias = Callable[[int, int, int, int, bool, int, int], int | bytes | None]
"""What :meth:`Transport.start_decoded` is given: ``answer(partition, vp, port, access_info, is_write, rax,
next_rip)`` for an intercept the transport decoded itself, without building its frame.

It returns what :meth:`dispatcher.Engine.answer_port` does: None (nothing
ran: pass the frame to the inline answer instead), an int (the usual
completion: for an IN, the value to merge into RAX) or a completion frame.
Called like the inline answer: from the transport's own thread.
"""


class Transport(abc.ABC):
    """One connection carrying whole frames in both directions.

    Frames travel in batches so a busy connection costs one await per batch,
    not one per frame.

    Optional features are declared here, with their defaults, so a
    dispatcher never probes for them:

    - :attr:`guest`: the guest memory (and hooks) string I/O on this
      connection uses; None where the connection carries none.
    - :attr:`stops_reading`: True when :meth:`stop_reading` makes a pending
      :meth:`receive_batch` deliver the frames that had arrived and then end
      the stream; False (the default) when a reader must be cancelled instead.
    - :attr:`answers_inline`: True when the transport can run synchronous
      handlers on its own thread where the frames arrive
      (:meth:`start_inline`), with no trip through the event loop.
    - :attr:`answers_decoded`: True when, answering inline, the transport
      can also hand over intercepts it has decoded itself
      (:meth:`start_decoded`), skipping the frame in the common case.
    """

    stops_reading: ClassVar[bool] = False
    """True when :meth:`stop_reading` ends a pending :meth:`receive_batch` (see above)."""

    answers_inline: ClassVar[bool] = False
    """True when :meth:`start_inline` is supported (see :meth:`start_inline`)."""

    answers_decoded: ClassVar[bool] = False
    """True when :meth:`start_decoded` is supported (see :meth:`start_decoded`)."""

    @property
    def guest(self) -> Guest | None:
        """The guest this connection serves, if it carries guest memory."""
        return None

    @abc.abstractmethod
    async def receive_batch(self) -> list[bytes]:
        """Wait for at least one frame; return every frame ready now.

        Returns an empty list once the other side has closed. Raises
        :class:`~dispatcher.TransportError` if the connection breaks.
        """

    @abc.abstractmethod
    async def send_batch(self, frames: Sequence[bytes]) -> None:
        """Send frames in order. Raises ``TransportClosedError`` if the peer is gone."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close both directions; closing twice is harmless."""

    def stop_reading(self) -> None:  # noqa: B027 (a declared no-op default, not an abstract method)
        """Graceful stop: read no more. Where :attr:`stops_reading` is False this does nothing."""

    def start_inline(self, answer: InlineAnswer) -> None:
        """Answer frames where they arrive: from now on, hand every received batch to ``answer``.

        Called once, from the event loop, before the first :meth:`receive_batch`.
        The transport then calls ``answer(frames)`` from its own thread(s)
        and sends the completions it returns at once, in order, on that
        thread. Completions of work the loop runs (async handlers) are sent
        later with :meth:`send_batch`, so sending must be thread-safe.
        :meth:`receive_batch` then returns ``[]`` once the transport has
        ended (end of stream, :meth:`stop_reading`, :meth:`aclose`) and no
        call of ``answer`` is running or will run, and may return frames it
        wants the loop to handle. Raises ``NotImplementedError`` unless
        :attr:`answers_inline` is True.
        """
        raise NotImplementedError(f"{type(self).__name__} does not answer inline")

    def start_decoded(self, answer: DecodedAnswer) -> None:
        """Besides :meth:`start_inline`'s answer, hand decoded intercepts to ``answer`` first.

        Called once, from the event loop, after :meth:`start_inline` and
        before the first :meth:`receive_batch`, when nothing needs to see
        every frame. Where ``answer`` returns None the transport builds the
        frame and calls the inline answer as usual. Raises
        ``NotImplementedError`` unless :attr:`answers_decoded` is True.
        """
        raise NotImplementedError(f"{type(self).__name__} does not answer decoded intercepts")

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
