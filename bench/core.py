"""Intercepts per second through the sans-I/O core and through the dispatcher on the in-memory transport.

The baseline is the least code that does the same job by hand: one
``struct.unpack_from`` of the fields needed, a dict lookup of the handler,
the same handler call, and one ``struct.pack_into`` of the completion. It
validates nothing, splits nothing and keeps no statistics; the ratio shows
what the core's checks and semantics cost.
"""

from __future__ import annotations

import statistics
import struct
import time
from collections.abc import Callable

import anyio

from dispatcher import (
    COMPLETION,
    AccessInfo,
    AccessType,
    Dispatcher,
    Engine,
    IoPortInterceptMessage,
    PortAccess,
    Router,
)
from transports.memory import memory_transport_pair


def make_router() -> tuple[Router, dict[int, Callable[[PortAccess], int | None]]]:
    router = Router()
    scratch = [0]

    def write_scratch(access: PortAccess) -> None:
        scratch[0] = access.value

    def read_status(access: PortAccess) -> int:
        return 0x60 | scratch[0] & 1

    router.add(write_scratch, 0x3FF, access="w")
    router.add(read_status, 0x3FD, access="r")
    return router, {0x3FF: write_scratch, 0x3FD: read_status}


def make_frames(vps: int) -> list[bytes]:
    """One write and one read per VP, as a UART putc loop does."""
    frames = []
    for vp in range(vps):
        for port, access in ((0x3FF, AccessType.WRITE), (0x3FD, AccessType.READ)):
            frames.append(
                IoPortInterceptMessage(
                    port_number=port,
                    access_type=access,
                    access_info=AccessInfo.build(1),
                    rax=0x41 + vp,
                    vp_index=vp,
                    instruction_length=1,
                    rip=0x1000,
                ).to_bytes()
            )
    return frames


_BASE_IN = struct.Struct("<I4xQIBBH16xQ8xHBBIQ")
_BASE_OUT = struct.Struct("<I4BQIBBHQQQQQHBBI")


def baseline(frames: list[bytes], handlers: dict[int, Callable[[PortAccess], int | None]]) -> list[bytes]:
    out = []
    new = tuple.__new__
    for frame in frames:
        _, partition, vp, length, access, _, rip, port, info, _, _, rax = _BASE_IN.unpack_from(frame)
        handler = handlers.get(port)
        size = info & 7
        value = handler(new(PortAccess, (port, size, access == 1, rax & 0xFF, 0, vp, partition))) if handler else 0xFF
        buffer = bytearray(72)
        _BASE_OUT.pack_into(
            buffer,
            0,
            COMPLETION,
            56,
            0,
            0,
            0,
            partition,
            vp,
            1,
            0,
            3,
            rip + (length & 0xF),
            (rax & ~0xFF) | (value or 0),
            0,
            0,
            0,
            port,
            info,
            0,
            0,
        )
        out.append(bytes(buffer))
    return out


def median_rate(work: Callable[[], int], seconds: float) -> float:
    """Median rate over short chunks of ``work`` (which returns how many intercepts it did).

    This machine class stalls for 0.3-1.8 s about once a second; the median
    of short chunks measures the code, not the stalls.
    """
    rates: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 5:
        start = time.perf_counter()
        done = work()
        rates.append(done / (time.perf_counter() - start))
    return statistics.median(rates)


async def _memory_rate(vps: int, seconds: float) -> float:
    router, _ = make_router()
    frames = make_frames(vps)
    reads, writes = frames[1::2], frames[0::2]
    client, server = memory_transport_pair()
    dispatcher = Dispatcher(router)
    rounds = max(4, 200 // vps)  # short chunks: see median_rate

    async def chunk() -> float:
        # Each VP has one intercept in flight at a time, as a real VP does.
        start = time.perf_counter()
        for i in range(rounds):
            await client.send_batch(writes if i % 2 else reads)
            got = 0
            while got < vps:
                got += len(await client.receive_batch())
        return rounds * vps / (time.perf_counter() - start)

    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.serve, server)
        rates = [await chunk()]
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(rates) < 5:
            rates.append(await chunk())
        dispatcher.stop()
        await client.aclose()
    return statistics.median(rates)


def run(quick: bool) -> dict[str, float]:
    seconds = 1.0 if quick else 4.0
    router, handlers = make_router()
    frames = make_frames(64)
    engine = Engine(router)
    core = median_rate(lambda: len(engine.receive(frames)[0]), seconds)
    base = median_rate(lambda: len(baseline(frames, handlers)), seconds)
    figures = {"core_per_s": core, "core_baseline_per_s": base, "core_ratio": core / base}
    print(f"core alone        {core:>12,.0f} /s   baseline {base:>12,.0f} /s   ratio {core / base:.2f}")
    for backend in ("asyncio", "trio"):
        for vps in (1, 64):
            value = anyio.run(_memory_rate, vps, seconds, backend=backend)
            key = f"memory_{vps}vp_per_s" if backend == "asyncio" else f"memory_{vps}vp_trio_per_s"
            figures[key] = value
            print(f"memory {backend:<7} {vps:>2} VP {value:>12,.0f} /s   vs core baseline {value / base:.2f}")
    return figures
