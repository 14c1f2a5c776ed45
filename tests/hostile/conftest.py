"""Hostile-client tests: each test starts its own ``serve`` (isolated, the default) and attacks it."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hostile_client import descendants
from service_process import ServiceProcess

HERE = Path(__file__).parent
DEVICES = "hostile_devices:vm_devices"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    (
        """Start ``serve --device hostile_devices:vm_devices`` (more arguments may follow); stopped after the test.

    ServiceProcess passes ``cwd`` (this directory) as ``--device-path``.
    """
        ""
    )
    started: list[ServiceProcess] = []

    def start(*args: str, deadline: str = "30", cwd: Path = HERE, socket: Path | None = None) -> ServiceProcess:
        process = ServiceProcess(
            tmp_path,
            "--device",
            DEVICES,
            "--deadline",
            deadline,
            *args,
            socket=socket or tmp_path / f"s{len(started)}.sock",
            cwd=cwd,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            # The workers too: a test that failed must not leave them behind.
            for pid in reversed(descendants(process.process.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        process.wait()
