"""The backend service over a UNIX socket and over pipes, beside a raw socketpair echo.

The service runs as ``python -m dispatcher serve`` in a child process, with
the bundled default devices; every intercept is ``in al, dx`` from the
UART's scratch register (0x3FF). The VMM side here is a plain blocking
client (what a VMM written in C would do), so the figures are the
service's, not an asyncio client's.

The baseline is the least a service could do: a second process that echoes
each frame back over a blocking ``socketpair``, with the same blocking
client. Targets: 1-VP round trips at least half the echo's rate; 64 VPs
(each with one intercept in flight) at least twice the echo's 1-VP rate.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Protocol

from dispatcher import AccessInfo, AccessType, IoPortInterceptMessage

COMPLETION_SIZE = 72
SCRATCH = 0x3FF


class Channel(Protocol):
    def send(self, data: bytes) -> None: ...
    def recv(self) -> bytes: ...


class SocketChannel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> bytes:
        data = self.sock.recv(1 << 16)
        if not data:
            raise EOFError
        return data


class PipeChannel:
    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view) :]

    def recv(self) -> bytes:
        data = os.read(self.read_fd, 1 << 16)
        if not data:
            raise EOFError
        return data


def frame(vp: int) -> bytes:
    return IoPortInterceptMessage(
        port_number=SCRATCH, access_type=AccessType.READ, access_info=AccessInfo.build(1), vp_index=vp
    ).to_bytes()


def round_trips(channel: Channel, count: int, reply_size: int) -> list[float]:
    """One VP: send, wait for the whole reply, repeat. Returns each round trip's seconds."""
    request = frame(0)
    times = []
    clock = time.perf_counter
    for _ in range(count):
        start = clock()
        channel.send(request)
        got = 0
        while got < reply_size:
            got += len(channel.recv())
        times.append(clock() - start)
    return times


def throughput(channel: Channel, vps: int, count: int) -> float:
    """``vps`` VPs, each re-sending as soon as its completion arrives. Returns completions/s."""
    frames = [frame(vp) for vp in range(vps)]
    channel.send(b"".join(frames))
    done = 0
    pending = b""
    start = time.perf_counter()
    while done < count:
        data = pending + channel.recv()
        whole = len(data) - len(data) % COMPLETION_SIZE
        pending = data[whole:]
        ready = [frames[int.from_bytes(data[at + 16 : at + 20], "little")] for at in range(0, whole, COMPLETION_SIZE)]
        done += len(ready)
        channel.send(b"".join(ready))
    elapsed = time.perf_counter() - start
    # Drain what is still in flight so the next run starts clean.
    outstanding = vps * COMPLETION_SIZE - len(pending)
    while outstanding > 0:
        outstanding -= len(channel.recv())
    return done / elapsed


def raw_echo(count: int) -> list[float]:
    """The baseline: a forked process echoing every read back over a blocking socketpair."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        try:
            while data := theirs.recv(1 << 16):
                theirs.sendall(data)
        finally:
            os._exit(0)
    theirs.close()
    try:
        return round_trips(SocketChannel(ours), count, len(frame(0)))
    finally:
        ours.close()
        os.waitpid(pid, 0)


def serve_command(backend: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dispatcher", "serve", "--log-level", "WARNING", "--backend", backend, *extra]


def with_socket_service(backend: str, work: Callable[[Channel], dict[str, float]]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "bench.sock")
        process = subprocess.Popen(serve_command(backend, "--socket", path))
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            deadline = time.monotonic() + 30
            while True:
                try:
                    sock.connect(path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError("the service did not start") from None
                    time.sleep(0.05)
            channel = SocketChannel(sock)
            skip_announcement(channel)
            result = work(channel)
            sock.close()
            return result
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


def with_pipe_service(backend: str, work: Callable[[Channel], dict[str, float]]) -> dict[str, float]:
    process = subprocess.Popen(serve_command(backend, "--stdio"), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    try:
        channel = PipeChannel(process.stdout.fileno(), process.stdin.fileno())
        skip_announcement(channel)
        return work(channel)
    finally:
        process.stdin.close()
        process.wait(timeout=30)
        process.stdout.close()


def skip_announcement(channel: Channel) -> None:
    # The default device set fits one announcement frame: 16 + 8 + 8 bytes.
    data = b""
    while len(data) < 32:
        data += channel.recv()


def percentile(ordered: list[float], point: float) -> float:
    return ordered[min(len(ordered) - 1, round(point / 100 * (len(ordered) - 1)))]


def measure(channel: Channel, count: int, prefix: str) -> dict[str, float]:
    round_trips(channel, count // 10, COMPLETION_SIZE)  # warm up
    times = sorted(round_trips(channel, count, COMPLETION_SIZE))
    figures = {
        f"{prefix}_1vp_per_s": len(times) / sum(times),
        f"{prefix}_1vp_rtt_p50_us": percentile(times, 50) * 1e6,
        f"{prefix}_1vp_rtt_p99_us": percentile(times, 99) * 1e6,
    }
    for vps in (16, 64):
        figures[f"{prefix}_{vps}vp_per_s"] = max(throughput(channel, vps, count * 4) for _ in range(2))
    return figures


def run(quick: bool) -> dict[str, float]:
    count = 4000 if quick else 20000
    raw_times = sorted(raw_echo(count))
    raw = len(raw_times) / sum(raw_times)
    figures: dict[str, float] = {
        "raw_echo_per_s": raw,
        "raw_echo_rtt_p50_us": percentile(raw_times, 50) * 1e6,
        "raw_echo_rtt_p99_us": percentile(raw_times, 99) * 1e6,
    }
    print(f"raw socketpair echo: {raw:,.0f} round trips/s, p50 {figures['raw_echo_rtt_p50_us']:.1f} us")
    backends = ["asyncio", "uvloop"] if _has_uvloop() else ["asyncio"]
    if not quick:
        backends.append("trio")
    for backend in backends:
        suffix = "" if backend == "asyncio" else f"_{backend}"
        for kind, runner in (("unix", with_socket_service), ("pipe", with_pipe_service)):
            result = runner(backend, lambda channel, kind=kind: measure(channel, count, kind))
            for name, value in result.items():
                figures[name + suffix] = value
            one, many = result[f"{kind}_1vp_per_s"], result[f"{kind}_64vp_per_s"]
            print(
                f"{kind:4} {backend:7}: 1 VP {one:,.0f}/s ({one / raw:.2f}x raw, target 0.5x), "
                f"p50 {result[f'{kind}_1vp_rtt_p50_us']:.1f} us, p99 {result[f'{kind}_1vp_rtt_p99_us']:.1f} us; "
                f"16 VPs {result[f'{kind}_16vp_per_s']:,.0f}/s; "
                f"64 VPs {many:,.0f}/s ({many / raw:.2f}x raw 1-VP, target 2x)"
            )
        figures[f"unix_1vp_ratio{suffix}"] = figures[f"unix_1vp_per_s{suffix}"] / raw
        figures[f"unix_64vp_ratio{suffix}"] = figures[f"unix_64vp_per_s{suffix}"] / raw
    return figures


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=1, sort_keys=True))
