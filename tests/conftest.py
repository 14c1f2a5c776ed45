"""Every async test runs on both anyio backends; no test asserts on time."""

from __future__ import annotations

import pytest
from hypothesis import settings

# Hypothesis' per-example deadline is a timing assertion; on a shared 2-core
# machine it fails for reasons unrelated to the code. Speed lives in bench/.
settings.register_profile("project", deadline=None)
settings.load_profile("project")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
