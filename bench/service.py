"""The backend service over a UNIX socket and over pipes, beside a raw socketpair echo.

The service runs as ``python -m examples serve`` in a child process, with
the bundled default devices; every intercept is ``in al, dx`` from the
UART's scratch register (0x3FF). The VMM side here is a plain blocking
client (what a VMM written in C would do), so the figures are the
service's, not an asyncio client's.

The baseline is the least a service could do: a second process that echoes
each frame back over a blocking ``socketpair``, with the same blocking
client. Targets: 1-VP round trips at least half the echo's rate; 64 VPs
(each with one intercept in flight) at least twice the echo's 1-VP rate.

``unix_1vp_ratio`` (and ``_trio``) is the dispatch path alone: one VP's
round trips through a :class:`~dispatcher.Dispatcher` serving a socketpair
with a synchronous handler (answered on the transport's reader thread),
over the raw echo's rate, the two measured in alternating stretches of the
same run so that a busy machine weighs on both alike.

A second reference, the event-loop floor, shows where 1-VP time goes: the
same echo written the way any anyio service must wait (``wait_readable``,
then a non-blocking read and write), with no decoding and no dispatch. No
service that waits through anyio can answer faster. Rates are those of the
best stretch of a run (as bench/core.py takes the best of several runs):
the machines are shared, and a stretch in which another process holds the
CPU says nothing about this code. The end-to-end figures of the project's
own asyncio client (``client_*``) show what a VMM written in Python gets.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

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


def _against_forked_loop(
    backend: str, count: int, serve: Callable[[socket.socket], Coroutine[Any, Any, None]]
) -> list[float]:
    """One VP's round trip times against ``serve(sock)``, run on ``backend`` in a forked process."""
    import anyio

    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        try:
            options = {"use_uvloop": True} if backend == "uvloop" else {}
            anyio.run(serve, theirs, backend="asyncio" if backend == "uvloop" else backend, backend_options=options)
        finally:
            os._exit(0)
    theirs.close()
    try:
        channel = SocketChannel(ours)
        round_trips(channel, count // 10, COMPLETION_SIZE)
        return round_trips(channel, count, COMPLETION_SIZE)
    finally:
        ours.close()
        os.waitpid(pid, 0)


def loop_floor(backend: str, count: int) -> list[float]:
    """The event-loop floor: an anyio echo (wait_readable, recv, send) in a forked process."""
    import anyio

    async def echo(sock: socket.socket) -> None:
        sock.setblocking(False)
        while True:
            await anyio.wait_readable(sock)
            data = sock.recv(1 << 16)
            if not data:
                return
            sock.send(data[:COMPLETION_SIZE])

    return _against_forked_loop(backend, count, echo)


def dispatcher_unix(backend: str, count: int) -> list[float]:
    """One VP through a Dispatcher over a socketpair, with a synchronous handler, in a forked process.

    No service around it: this is the dispatch path itself (the inline
    reader thread, the engine, the write), on the given event loop.
    """
    from dispatcher import Dispatcher, PortAccess, Router
    from transports.unix import UnixTransport

    router = Router()

    @router.claim(SCRATCH)
    def scratch(access: PortAccess) -> int:
        return 0x5A

    async def serve(sock: socket.socket) -> None:
        # The default handler deadline: its watchdog is part of the cost.
        await Dispatcher(router).serve(UnixTransport(sock, name="bench"))

    return _against_forked_loop(backend, count, serve)


def dispatcher_ratio(backend: str, count: int) -> dict[str, float]:
    """``unix_1vp_*``: the Dispatcher over a socketpair beside the raw echo, alternating stretches of each."""
    suffix = "" if backend == "asyncio" else f"_{backend}"
    raw: list[float] = []
    ours: list[float] = []
    for _ in range(6):
        raw += raw_echo(count // 6)
        ours += dispatcher_unix(backend, count // 6)
    raw_rate, our_rate = best_rate(raw), best_rate(ours)
    raw.sort()
    ours.sort()
    figures = {
        f"unix_1vp_ratio{suffix}": our_rate / raw_rate,
        f"dispatcher_unix_1vp_per_s{suffix}": our_rate,
        f"dispatcher_unix_1vp_rtt_p50_us{suffix}": percentile(ours, 50) * 1e6,
        f"dispatcher_unix_1vp_rtt_p99_us{suffix}": percentile(ours, 99) * 1e6,
        f"dispatcher_raw_echo_per_s{suffix}": raw_rate,
        f"dispatcher_raw_echo_rtt_p50_us{suffix}": percentile(raw, 50) * 1e6,
        f"dispatcher_raw_echo_rtt_p99_us{suffix}": percentile(raw, 99) * 1e6,
    }
    print(
        f"{backend:7} Dispatcher over a socketpair, sync handler: 1 VP {our_rate:,.0f}/s "
        f"({our_rate / raw_rate:.2f}x raw echo {raw_rate:,.0f}/s, target 0.5x); "
        f"p50 {figures[f'dispatcher_unix_1vp_rtt_p50_us{suffix}']:.1f} us "
        f"(raw {figures[f'dispatcher_raw_echo_rtt_p50_us{suffix}']:.1f}), "
        f"p99 {figures[f'dispatcher_unix_1vp_rtt_p99_us{suffix}']:.1f} us "
        f"(raw {figures[f'dispatcher_raw_echo_rtt_p99_us{suffix}']:.1f})",
        flush=True,
    )
    return figures


def serve_command(backend: str, *extra: str) -> list[str]:
    # No handler deadline: a stall of the machine must not turn into DEADLINE_EXCEEDED replies.
    return [
        sys.executable,
        "-m",
        "examples",
        "serve",
        "--log-level",
        "WARNING",
        "--deadline",
        "0",
        "--backend",
        backend,
        *extra,
    ]


def client_figures(path: str, count: int) -> dict[str, float]:
    """The project's VMM-side client (transports.service) against the running service."""
    import anyio

    from transports.service import connect_service

    async def drive() -> dict[str, float]:
        async with connect_service(path, announce_timeout=60) as client:
            one = frame(0)
            times = []
            for _ in range(count):
                start = time.perf_counter()
                await client.exchange(one)
                times.append(time.perf_counter() - start)
            done = 0

            async def vp(index: int) -> None:
                nonlocal done
                request = frame(index)
                for _ in range(25):
                    await client.exchange(request)
                    done += 1

            best = 0.0
            for _ in range(max(3, count // 500)):
                done, start = 0, time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for index in range(64):
                        tg.start_soon(vp, index)
                best = max(best, done / (time.perf_counter() - start))
        return {"client_1vp_per_s": best_rate(times), "client_64vp_per_s": best}

    return anyio.run(drive)


def with_socket_service(
    backend: str, work: Callable[[Channel], dict[str, float]], *, client_count: int = 0
) -> dict[str, float]:
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
            if client_count:
                result.update(client_figures(path, client_count))
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
    """Open the session as VM 0 (a HELLO) and read up to the port announcement."""
    from dispatcher.hello import Hello, decode_hello_reply, encode_hello
    from dispatcher.wire import ANNOUNCEMENT, HELLO_REPLY, message_type
    from transports.framing import FrameSplitter

    channel.send(encode_hello(Hello(0)))
    splitter = FrameSplitter()
    while True:
        for got in splitter.feed(channel.recv()):
            kind = message_type(got)
            if kind == HELLO_REPLY and not (reply := decode_hello_reply(got)).accepted:
                raise RuntimeError(f"the service refused the session: {reply.status.name} {reply.reason}")
            if kind == ANNOUNCEMENT:
                return


def percentile(ordered: list[float], point: float) -> float:
    return ordered[min(len(ordered) - 1, round(point / 100 * (len(ordered) - 1)))]


def best_rate(times: list[float], chunk: int = 250) -> float:
    """Round trips per second over the best stretch of ``chunk`` consecutive ones.

    As bench/core.py takes the best of several runs: the machines are shared,
    and one stretch in which another process holds the CPU would otherwise
    decide the figure.
    """
    return max(len(times[at : at + chunk]) / sum(times[at : at + chunk]) for at in range(0, len(times), chunk))


def measure(channel: Channel, count: int, prefix: str) -> dict[str, float]:
    round_trips(channel, count // 10, COMPLETION_SIZE)  # warm up
    times = round_trips(channel, count, COMPLETION_SIZE)
    ordered = sorted(times)
    figures = {
        f"{prefix}_1vp_per_s": best_rate(times),
        f"{prefix}_1vp_rtt_p50_us": percentile(ordered, 50) * 1e6,
        f"{prefix}_1vp_rtt_p99_us": percentile(ordered, 99) * 1e6,
    }
    for vps in (16, 64):
        runs = max(4, count // 250)
        figures[f"{prefix}_{vps}vp_per_s"] = max(throughput(channel, vps, 64 * vps) for _ in range(runs))
    return figures


def run(quick: bool) -> dict[str, float]:
    count = 1000 if quick else 20000
    dispatch: dict[str, float] = {}
    for backend in ("asyncio", "trio"):
        dispatch |= dispatcher_ratio(backend, 6 * count)
    # The echo runs before and after the rest; its best stretch is the baseline.
    first = raw_echo(count)
    backends = ["asyncio", "uvloop"] if _has_uvloop() else ["asyncio"]
    if not quick:
        backends.append("trio")
    results: dict[str, float] = {}
    for backend in backends:
        suffix = "" if backend == "asyncio" else f"_{backend}"
        floor = loop_floor(backend, count)
        results[f"loop_floor_1vp_per_s{suffix}"] = best_rate(floor)
        results[f"loop_floor_1vp_rtt_p50_us{suffix}"] = percentile(sorted(floor), 50) * 1e6
        try:
            unix = with_socket_service(
                backend,
                functools.partial(measure, count=count, prefix="unix"),
                client_count=min(count, 2000) if not suffix else 0,
            )
            pipe = with_pipe_service(backend, functools.partial(measure, count=count, prefix="pipe"))
        except (OSError, EOFError, RuntimeError) as error:
            print(f"{backend:7} the service could not be measured: {error!r}", flush=True)
            return dispatch
        results.update({name + suffix: value for name, value in (unix | pipe).items()})
    raw_times = first + raw_echo(count)
    raw = best_rate(raw_times)
    raw_times.sort()
    figures: dict[str, float] = {
        "raw_echo_per_s": raw,
        "raw_echo_rtt_p50_us": percentile(raw_times, 50) * 1e6,
        "raw_echo_rtt_p99_us": percentile(raw_times, 99) * 1e6,
        **results,
    }
    print(f"raw socketpair echo: {raw:,.0f} round trips/s, p50 {figures['raw_echo_rtt_p50_us']:.1f} us")
    print(
        f"asyncio client (transports.service) over unix: 1 VP {figures['client_1vp_per_s']:,.0f}/s, "
        f"64 VPs {figures['client_64vp_per_s']:,.0f}/s"
    )
    for backend in backends:
        suffix = "" if backend == "asyncio" else f"_{backend}"
        floor_rate = figures[f"loop_floor_1vp_per_s{suffix}"]
        print(
            f"{backend:7} event-loop floor (anyio echo): {floor_rate:,.0f}/s ({floor_rate / raw:.2f}x raw), "
            f"p50 {figures[f'loop_floor_1vp_rtt_p50_us{suffix}']:.1f} us"
        )
        for kind in ("unix", "pipe"):
            one, many = figures[f"{kind}_1vp_per_s{suffix}"], figures[f"{kind}_64vp_per_s{suffix}"]
            print(
                f"{backend:7} {kind}: 1 VP {one:,.0f}/s ({one / raw:.2f}x raw, target 0.5x), "
                f"p50 {figures[f'{kind}_1vp_rtt_p50_us{suffix}']:.1f} us, "
                f"p99 {figures[f'{kind}_1vp_rtt_p99_us{suffix}']:.1f} us; "
                f"16 VPs {figures[f'{kind}_16vp_per_s{suffix}']:,.0f}/s; "
                f"64 VPs {many:,.0f}/s ({many / raw:.2f}x raw 1-VP, target 2x)"
            )
        figures[f"service_unix_1vp_ratio{suffix}"] = figures[f"unix_1vp_per_s{suffix}"] / raw
        figures[f"unix_64vp_ratio{suffix}"] = figures[f"unix_64vp_per_s{suffix}"] / raw
        figures[f"pipe_1vp_ratio{suffix}"] = figures[f"pipe_1vp_per_s{suffix}"] / raw
        figures[f"pipe_64vp_ratio{suffix}"] = figures[f"pipe_64vp_per_s{suffix}"] / raw
    return figures | dispatch


def _has_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=1, sort_keys=True))
