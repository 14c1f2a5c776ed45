"""``python -m examples serve`` as a child process, for the tests of every directory.

The service never imports device code from its working directory: the
directory a test names as ``cwd`` (where its device modules live) is passed
as ``--device-path``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

SERVICE_TESTS = Path(__file__).parent / "service"  # where the service tests' device modules live


def serve_command(*args: str, backend: str = "asyncio") -> list[str]:
    return [sys.executable, "-m", "examples", "serve", "--backend", backend, *args]


class ServiceProcess:
    """A service child process whose log goes to a file the test can read."""

    def __init__(
        self,
        tmp: Path,
        *args: str,
        socket: Path | None = None,
        backend: str = "asyncio",
        ready: bool = True,
        cwd: Path = SERVICE_TESTS,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.socket = socket
        args = ("--device-path", str(cwd), *args)
        if socket is not None:
            args = (*args, "--socket", str(socket))
        self.log_path = tmp / f"service-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            serve_command(*args, backend=backend), cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=self._log
        )
        if ready:
            self.wait_for_log("serving on", ready_timeout)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the service exited ({self.process.returncode}) before logging {text!r}:\n{self.log}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"the service did not log {text!r} within {timeout} s:\n{self.log}")
            time.sleep(0.02)

    def signal(self, number: int = signal.SIGTERM) -> None:
        self.process.send_signal(number)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait()
