"""Service tests: one service process per module and backend, shared by the tests that only talk to it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from service_helpers import SERVE_ARGS
from service_process import ServiceProcess


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Module-scoped here, so a service started for one backend serves all of that backend's tests."""
    return str(request.param)


@pytest.fixture(scope="module")
def service(anyio_backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """``serve --device service_devices:router`` on a fresh socket, the event loop matching the test's."""
    tmp = tmp_path_factory.mktemp(f"service-{anyio_backend}")
    # A hundred connections of this one user at once in one test: past the default limit per user.
    args = (*SERVE_ARGS, "--max-connections-per-uid", "256")
    process = ServiceProcess(tmp, *args, socket=tmp / "s.sock", backend=anyio_backend)
    yield process
    assert process.stop() == 0, process.log


@pytest.fixture
def socket_path(service: ServiceProcess) -> Path:
    assert service.socket is not None
    return service.socket
