"""What the service tests share: their device module's arguments and intercept frames."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from dispatcher import AccessInfo, AccessType, IoPortInterceptMessage, TransportClosedError, decode_announcement
from dispatcher.hello import Hello, HelloStatus, decode_hello_reply, encode_hello
from dispatcher.wire import ANNOUNCEMENT, HELLO_REPLY, message_type
from transports.unix import UnixTransport, connect_unix

HERE = Path(__file__).parent
# A generous handler deadline: a loaded test machine must not turn slow handlers into failures.
SERVE_ARGS = ("--device", "service_devices:router", "--device-path", str(HERE), "--deadline", "30")


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


def hello(vm: int = 0) -> bytes:
    """The HELLO a VMM opens its connection with, naming VM ``vm``."""
    return encode_hello(Hello(vm=vm))


async def connect_raw(path: Path, vm: int = 0) -> UnixTransport:
    """A raw connection past its opening: HELLO sent, HELLO_REPLY (accepted) and the announcement read."""
    transport = await connect_unix(path)
    await transport.send_batch([hello(vm)])
    announced = False
    while not announced:
        frames = await transport.receive_batch()
        if not frames:
            raise TransportClosedError(f"the service at {path} closed the connection during the opening")
        for frame in frames:
            if message_type(frame) == HELLO_REPLY:
                reply = decode_hello_reply(frame)
                assert reply.status is HelloStatus.ACCEPTED, reply
            elif message_type(frame) == ANNOUNCEMENT:
                announced = decode_announcement(frame)[1]
    return transport
