"""pytest fixtures for device tests, registered through the ``pytest11`` entry point.

A test module supplies a ``router`` fixture; ``fake_partition`` runs it behind
a real Dispatcher and ``fake_vp`` is that partition's VP 0. Tests using them
are async and need anyio's pytest plugin (``@pytest.mark.anyio``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from dispatcher import Router

from .testing import FakePartition, FakeVP


@pytest.fixture
async def fake_partition(router: Router) -> AsyncIterator[FakePartition]:
    """A running :class:`~transports.testing.FakePartition` serving the ``router`` fixture."""
    async with FakePartition(router) as partition:
        yield partition


@pytest.fixture
def fake_vp(fake_partition: FakePartition) -> FakeVP:
    """VP 0 of ``fake_partition``."""
    return fake_partition.vp(0)
