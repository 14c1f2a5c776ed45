"""The interface every transport implements: batches of frames in and out."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from types import TracebackType

__all__ = ["Transport"]


class Transport(abc.ABC):
    """One connection carrying whole frames in both directions.

    Frames travel in batches so a busy connection costs one await per batch,
    not one per frame.
    """

    @abc.abstractmethod
    async def receive_batch(self) -> list[bytes]:
        """Wait for at least one frame; return every frame ready now.

        Returns an empty list once the other side has closed. Raises
        :class:`~dispatcher.errors.TransportError` if the connection breaks.
        """

    @abc.abstractmethod
    async def send_batch(self, frames: Sequence[bytes]) -> None:
        """Send frames in order. Raises ``TransportClosedError`` if the peer is gone."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close both directions; closing twice is harmless."""

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
