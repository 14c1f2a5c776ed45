"""The interface every transport implements: batches of frames in and out, and its declared features."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from types import TracebackType
from typing import ClassVar

from .guest import Guest

__all__ = ["Transport"]


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
    """

    stops_reading: ClassVar[bool] = False
    """True when :meth:`stop_reading` ends a pending :meth:`receive_batch` (see above)."""

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

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
