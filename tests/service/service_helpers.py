"""What the service tests share: their device module's arguments and intercept frames."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from dispatcher import AccessInfo, AccessType, IoPortInterceptMessage

HERE = Path(__file__).parent
# A generous handler deadline: a loaded test machine must not turn slow handlers into failures.
SERVE_ARGS = ("--device", "service_devices:router", "--deadline", "30")


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


def kill_quietly(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
