"""What isolation costs: ``serve`` (a supervisor and one worker process per VM) beside ``serve --in-process``.

Both services run as child processes with the bundled default devices, on
UNIX sockets of their own, and the same blocking client (bench/service.py's,
after the opening HELLO) drives each: one VP doing round trips to the UART
scratch register (0x3FF), then 64 VPs of one VM each with an intercept in
flight. The two sides are measured in turns, several times, the order
swapped each turn, so that drift of a shared machine falls on both alike;
each side's figure is its best turn, as bench/service.py takes the best
stretch. Targets: isolated at least 0.9x in-process for one VP's round
trips (``isolation_1vp_ratio``) and 0.8x for 64 VPs (``isolation_64vp_ratio``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from service import COMPLETION_SIZE, SocketChannel, best_rate, round_trips, throughput

from dispatcher import ANNOUNCEMENT, decode_announcement
from dispatcher.hello import Capability, Hello, HelloStatus, decode_hello_reply, encode_hello
from dispatcher.wire import HEADER_SIZE, message_type

VM = 0  # bench/service.py's frames carry partition 0
SIDES = ("isolated", "in_process")


def _command(socket_path: str, *extra: str) -> list[str]:
    # No handler deadline: a stall of the machine must not turn into DEADLINE_EXCEEDED replies.
    return [sys.executable, "-m", "examples", "serve", "--log-level", "WARNING", "--deadline", "0",
            "--socket", socket_path, *extra]  # fmt: skip


class _Reader:
    """Whole frames from a blocking socket, for the opening exchange."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def frame(self) -> bytes:
        while len(self.buffer) < HEADER_SIZE or len(self.buffer) < HEADER_SIZE + self.buffer[4]:
            data = self.sock.recv(1 << 16)
            if not data:
                raise RuntimeError("the service closed the connection during the opening")
            self.buffer += data
        size = HEADER_SIZE + self.buffer[4]
        frame, self.buffer = self.buffer[:size], self.buffer[size:]
        return frame


def _open_session(path: str, process: subprocess.Popen[bytes]) -> SocketChannel:
    """Connect (waiting for the service to listen), send HELLO, read the reply and the announcement."""
    deadline = time.monotonic() + 30
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"the service at {path} did not start") from None
            time.sleep(0.05)
    sock.sendall(encode_hello(Hello(VM, capabilities=Capability.GUEST_MEMORY)))
    reader = _Reader(sock)
    reply = decode_hello_reply(reader.frame())
    if reply.status is not HelloStatus.ACCEPTED:
        raise RuntimeError(f"the service refused the session: {reply.status.name}: {reply.reason}")
    while True:
        frame = reader.frame()
        if message_type(frame) == ANNOUNCEMENT and decode_announcement(frame)[1]:
            break
    if reader.buffer:
        raise RuntimeError("the service sent more than the announcement before any intercept")
    return SocketChannel(sock)


@contextmanager
def _services() -> Iterator[dict[str, SocketChannel]]:
    with tempfile.TemporaryDirectory() as directory:
        paths = {side: os.path.join(directory, f"{side}.sock") for side in SIDES}
        processes = {
            "isolated": subprocess.Popen(_command(paths["isolated"])),
            "in_process": subprocess.Popen(_command(paths["in_process"], "--in-process")),
        }
        channels: dict[str, SocketChannel] = {}
        try:
            for side in SIDES:
                channels[side] = _open_session(paths[side], processes[side])
            yield channels
        finally:
            for channel in channels.values():
                channel.sock.close()
            for process in processes.values():
                process.send_signal(signal.SIGTERM)
            for process in processes.values():
                process.wait(timeout=30)


def _turn(channel: SocketChannel, count: int) -> tuple[float, float]:
    """One turn on one side: (best 1-VP round trips/s, best 64-VP completions/s)."""
    one = best_rate(round_trips(channel, count, COMPLETION_SIZE))
    many = max(throughput(channel, 64, 64 * 64) for _ in range(max(2, count // 1000)))
    return one, many


def run(quick: bool) -> dict[str, float]:
    count = 2000 if quick else 20000
    turns = 6 if quick else 10
    best: dict[str, list[float]] = {side: [0.0, 0.0] for side in SIDES}
    with _services() as channels:
        for channel in channels.values():  # warm up: the worker's first intercepts, the caches
            round_trips(channel, count // 10, COMPLETION_SIZE)
            throughput(channel, 64, 64 * 16)
        for turn in range(turns):
            for side in SIDES if turn % 2 == 0 else SIDES[::-1]:
                one, many = _turn(channels[side], count)
                best[side][0] = max(best[side][0], one)
                best[side][1] = max(best[side][1], many)
    figures = {
        "isolation_isolated_1vp_per_s": best["isolated"][0],
        "isolation_in_process_1vp_per_s": best["in_process"][0],
        "isolation_isolated_64vp_per_s": best["isolated"][1],
        "isolation_in_process_64vp_per_s": best["in_process"][1],
        "isolation_1vp_ratio": best["isolated"][0] / best["in_process"][0],
        "isolation_64vp_ratio": best["isolated"][1] / best["in_process"][1],
    }
    print(
        f"1 VP:   isolated {figures['isolation_isolated_1vp_per_s']:,.0f}/s, "
        f"in-process {figures['isolation_in_process_1vp_per_s']:,.0f}/s: "
        f"{figures['isolation_1vp_ratio']:.2f}x (target 0.9x)"
    )
    print(
        f"64 VPs: isolated {figures['isolation_isolated_64vp_per_s']:,.0f}/s, "
        f"in-process {figures['isolation_in_process_64vp_per_s']:,.0f}/s: "
        f"{figures['isolation_64vp_ratio']:.2f}x (target 0.8x)"
    )
    return figures


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=1, sort_keys=True))
