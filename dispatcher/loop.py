"""The anyio layer: runs an :class:`~dispatcher.engine.Engine` over transports."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import anyio
import anyio.abc

from .engine import Engine
from .errors import TransportError
from .guest import Guest
from .port_io import Job, call_step
from .router import Router
from .stats import EngineStats
from .string_plan import DEFAULT_MAX_ELEMENTS
from .transport import Transport
from .wire import Status

__all__ = ["Dispatcher"]

log = logging.getLogger("intercept_dispatch.dispatcher")


class Dispatcher:
    """Serves intercepts from any number of transports with one router.

    Each :meth:`serve` call owns one connection: its own engine, so its VPs'
    ordering and failures never touch another connection. Statistics are
    shared across them.

    String I/O uses the transport's declared :attr:`~dispatcher.Transport.guest`
    where it has one (guest memory shared over that connection), else
    ``guest``; ``deadline`` and ``max_elements`` are those of
    :class:`~dispatcher.Engine`.
    """

    def __init__(
        self,
        router: Router,
        *,
        deadline: float | None = 5.0,
        guest: Guest | None = None,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        if max_elements < 1:
            raise ValueError(f"max_elements must be at least 1, not {max_elements}")
        self.router = router
        self.deadline = deadline
        self.guest = guest
        self.max_elements = max_elements
        self.stats = EngineStats()
        """Counts of every connection's intercepts: completed, failed, unclaimed accesses, per port."""
        self._stopping = False
        self._reads: set[anyio.CancelScope] = set()
        self._stop_readers: set[Callable[[], object]] = set()

    def stop(self) -> None:
        """Graceful stop: stop reading, finish in-flight intercepts, send their completions.

        Each :meth:`serve` call then returns once its completions are sent.
        A transport that declares :attr:`~dispatcher.Transport.stops_reading`
        is asked to stop instead of having its read cancelled: it still
        delivers the frames that had arrived, then reports end of stream, and
        those are answered too.
        """
        self._stopping = True
        for scope in self._reads:
            scope.cancel()
        for stop_reading in self._stop_readers:
            stop_reading()

    async def serve(
        self, transport: Transport, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Dispatch every frame ``transport`` delivers until it closes or :meth:`stop` is called.

        Closes the transport before returning. Signals readiness through
        ``task_status`` (use it with ``TaskGroup.start``).
        """
        engine = Engine(
            self.router,
            deadline=self.deadline,
            stats=self.stats,
            guest=transport.guest or self.guest,
            max_elements=self.max_elements,
        )
        send_lock = anyio.Lock(fast_acquire=True)

        async def send(frames: Sequence[bytes]) -> None:
            async with send_lock:
                await transport.send_batch(frames)

        async def run(job: Job | None) -> None:
            while job is not None:
                results: list[object] = []
                status, error = Status.COMPLETED, None
                with anyio.move_on_after(self.deadline if self.deadline is not None else float("inf")) as scope:
                    try:
                        for step in job.steps:
                            claim = step.claim
                            if claim is None:
                                results.append(None)
                            elif claim.is_async:
                                results.append(await cast(Awaitable[object], call_step(step)))
                            else:
                                results.append(call_step(step))
                    except Exception as exc:
                        status, error = Status.HANDLER_FAILED, exc
                if scope.cancelled_caught:
                    status = Status.DEADLINE_EXCEEDED
                out, more = engine.finish(job, results, status, error)
                await send(out)
                job = more[0] if more else None

        # A transport that can stop reading by itself needs no cancel scope per
        # read, which costs more than the rest of a small batch's round trip.
        stop_reading = transport.stop_reading if transport.stops_reading else None
        if stop_reading is not None:
            self._stop_readers.add(stop_reading)
            if self._stopping:
                stop_reading()
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                while True:
                    if stop_reading is not None:
                        frames = await transport.receive_batch()
                    elif self._stopping:
                        break
                    else:
                        with anyio.CancelScope() as scope:
                            self._reads.add(scope)
                            try:
                                frames = await transport.receive_batch()
                            finally:
                                self._reads.discard(scope)
                        if scope.cancelled_caught:
                            break
                    if not frames:
                        break
                    out, jobs = engine.receive(frames)
                    for job in jobs:
                        tg.start_soon(run, job)
                    if out:
                        await send(out)
        except* TransportError as group:
            # The task group wraps errors in an ExceptionGroup, whether the read loop or a job's send raised them.
            log.warning("connection lost: %s", "; ".join(str(error) for error in group.exceptions))
        finally:
            if stop_reading is not None:
                self._stop_readers.discard(stop_reading)
            with anyio.CancelScope(shield=True):
                await transport.aclose()
