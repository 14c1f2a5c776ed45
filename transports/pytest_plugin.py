"""pytest fixtures for device tests, registered through the ``pytest11`` entry point.

A test module supplies a ``router`` fixture; ``fake_partition`` runs it behind
a real Dispatcher and ``fake_vp`` is that partition's VP 0. Tests using them
are async and need anyio's pytest plugin (``@pytest.mark.anyio``).
``virtual_clock`` is the partition's clock: a ``router`` fixture that asks for
it builds its devices on the same virtual time the test moves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from dispatcher import Router
from dispatcher.clock import VirtualClock

from .testing import FakePartition, FakeVP


@pytest.fixture
def virtual_clock() -> VirtualClock:
    """A :class:`~dispatcher.clock.VirtualClock` at 0 ns: ``fake_partition``'s clock."""
    return VirtualClock()


@pytest.fixture
async def fake_partition(router: Router, virtual_clock: VirtualClock) -> AsyncIterator[FakePartition]:
    """A running :class:`~transports.testing.FakePartition` serving the ``router`` fixture on ``virtual_clock``."""
    async with FakePartition(router, clock=virtual_clock) as partition:
        yield partition


@pytest.fixture
def fake_vp(fake_partition: FakePartition) -> FakeVP:
    """VP 0 of ``fake_partition``."""
    return fake_partition.vp(0)
