"""Running ``python -m dispatcher serve`` as a child process for the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dispatcher import AccessInfo, AccessType, IoPortInterceptMessage

HERE = Path(__file__).parent
# A generous handler deadline: a loaded test machine must not turn slow handlers into failures.
SERVE_ARGS = ("--device", "service_devices:router", "--deadline", "30")


def serve_command(*args: str, backend: str = "asyncio") -> list[str]:
    return [sys.executable, "-m", "dispatcher", "serve", "--backend", backend, *args]


def intercept(port: int, *, vp: int = 0, write: bool = False, value: int = 0, size: int = 1) -> bytes:
    return IoPortInterceptMessage(
        port_number=port,
        access_type=AccessType.WRITE if write else AccessType.READ,
        access_info=AccessInfo.build(size),
        rax=value,
        vp_index=vp,
        instruction_length=1,
        rip=0x1000,
    ).to_bytes()


class ServiceProcess:
    """A service child process whose log goes to a file the test can read."""

    def __init__(
        self, tmp: Path, *args: str, socket: Path | None = None, backend: str = "asyncio", ready: bool = True
    ) -> None:
        self.socket = socket
        if socket is not None:
            args = (*args, "--socket", str(socket))
        self.log_path = tmp / f"service-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            serve_command(*args, backend=backend), cwd=HERE, stdout=subprocess.DEVNULL, stderr=self._log
        )
        if ready:
            self.wait_for_log("serving on")

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


def kill_quietly(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
