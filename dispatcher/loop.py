"""The anyio layer: runs an :class:`~dispatcher.engine.Engine` over transports."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Sequence
from typing import cast

import anyio
import anyio.abc

from .completion import Status
from .engine import Engine, EngineStats, Job
from .errors import TransportError
from .router import Router
from .transport import Transport

__all__ = ["Dispatcher"]

log = logging.getLogger("dispatcher")


class Dispatcher:
    """Serves intercepts from any number of transports with one router.

    Each :meth:`serve` call owns one connection: its own engine, so its VPs'
    ordering and failures never touch another connection. Statistics are
    shared across them.
    """

    def __init__(self, router: Router, *, deadline: float | None = 5.0) -> None:
        self.router = router
        self.deadline = deadline
        self.stats = EngineStats()
        self._stopping = False
        self._reads: set[anyio.CancelScope] = set()

    def stop(self) -> None:
        """Graceful stop: stop reading, finish in-flight intercepts, send their completions.

        Each :meth:`serve` call then returns once its completions are sent.
        """
        self._stopping = True
        for scope in self._reads:
            scope.cancel()

    async def serve(
        self, transport: Transport, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Dispatch every frame ``transport`` delivers until it closes or :meth:`stop` is called.

        Closes the transport before returning. Signals readiness through
        ``task_status`` (use it with ``TaskGroup.start``).
        """
        engine = Engine(self.router, deadline=self.deadline, stats=self.stats)
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
                                results.append(await cast(Awaitable[int | None], claim.handler(step.access)))
                            else:
                                results.append(claim.handler(step.access))
                    except Exception as exc:
                        status, error = Status.HANDLER_FAILED, exc
                if scope.cancelled_caught:
                    status = Status.DEADLINE_EXCEEDED
                out, more = engine.finish(job, results, status, error)
                await send(out)
                job = more[0] if more else None

        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                while not self._stopping:
                    with anyio.CancelScope() as scope:
                        self._reads.add(scope)
                        try:
                            frames = await transport.receive_batch()
                        finally:
                            self._reads.discard(scope)
                    if scope.cancelled_caught or not frames:
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
            with anyio.CancelScope(shield=True):
                await transport.aclose()
