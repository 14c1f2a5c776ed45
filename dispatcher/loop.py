"""The anyio layer: runs an :class:`~dispatcher.engine.Engine` over transports.

Where handlers run (docs/ARCHITECTURE.md, "Threading model"): a transport
that :attr:`~dispatcher.Transport.answers_inline` calls the engine on its
own thread, so a synchronous handler answers there and the event loop is
not involved; async handlers always run on the loop. All of a VM's device
code holds :attr:`Dispatcher.lock`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import FrameType
from typing import Any, cast

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel

from .device_lock import Acquire, LockedSteps
from .engine import Engine, EngineObserver
from .errors import TransportError
from .guest import Guest
from .port_io import Job, call_step
from .router import Router
from .stats import EngineStats
from .string_plan import DEFAULT_MAX_ELEMENTS
from .transport import DecodedAnswer, Transport
from .wire import Status, frame_ids

__all__ = ["DEFAULT_MAX_JOBS", "DEFAULT_MAX_QUEUED", "Dispatcher"]

log = logging.getLogger("intercept_dispatch.dispatcher")

DEFAULT_MAX_QUEUED = 256
"""Frames one connection may have waiting behind busy VPs before it is no longer read."""
DEFAULT_MAX_JOBS = 64
"""Jobs (async handler calls) one connection may have outstanding before it is no longer read."""

_RECEIVE_CODE = Engine.receive.__code__
_ANSWER_PORT_CODE = Engine.answer_port.__code__


class _Connection:
    """The state one :meth:`Dispatcher.serve` call shares between its loop and the transport's threads."""

    __slots__ = (
        "blocked",
        "calls",
        "done",
        "drained",
        "ended",
        "engine",
        "finished",
        "jobs",
        "loop_drained",
        "max_jobs",
        "max_queued",
        "sent",
        "sent_changed",
    )

    def __init__(self, engine: Engine, max_queued: int, max_jobs: int) -> None:
        self.engine = engine
        self.max_queued = max_queued
        self.max_jobs = max_jobs
        self.jobs = 0
        # The engine calls running on transports' threads, by thread: when
        # each started and the completions it has made so far. The watchdog
        # cannot take the VM lock (a hung handler holds it): a call is
        # claimed by popping it, atomically, by the thread or the watchdog.
        self.calls: dict[int, tuple[float, list[bytes]]] = {}
        self.ended = False
        self.blocked = False
        # Back-pressure: the inline reader waits on this until the bounds allow reading again.
        self.drained = threading.Condition(threading.Lock())
        self.loop_drained: anyio.Event | None = None
        # Order: the loop's completions are numbered as made, under the VM
        # lock; ``sent`` is the number up to which all have been sent. The
        # transport's thread sends a later completion only after those.
        self.finished = 0
        self.sent = 0
        self.done: set[int] = set()
        self.sent_changed = threading.Condition(threading.Lock())

    def over(self) -> bool:
        return self.engine.queued >= self.max_queued or self.jobs >= self.max_jobs

    def wait_sent(self, finished: int) -> None:
        """Block until the loop's completions numbered up to ``finished`` are sent, or the connection ends."""
        with self.sent_changed:
            self.sent_changed.wait_for(lambda: self.sent >= finished or self.ended)


class Dispatcher:
    """Serves intercepts from any number of transports with one router: one Dispatcher per VM.

    Each :meth:`serve` call owns one connection: its own engine, so its VPs'
    ordering and failures never touch another connection. Statistics are
    shared across them.

    String I/O uses the transport's declared :attr:`~dispatcher.Transport.guest`
    where it has one (guest memory shared over that connection), else
    ``guest``; ``deadline`` and ``max_elements`` are those of
    :class:`~dispatcher.Engine`.

    Bounds, per connection: ``max_queued`` frames waiting behind busy VPs
    and ``max_jobs`` async handler calls outstanding. Past either, the
    connection is not read until they drain (back-pressure; nothing is
    dropped). An inline transport's thread finishes the batch it has read,
    then waits before handing over the next.

    ``on_hung`` is called (on the event loop) with a one-line description
    when a synchronous handler running on a transport's thread passes the
    deadline without returning; see :meth:`serve`.

    ``observer`` (an :class:`~dispatcher.engine.EngineObserver`, such as a
    :class:`~dispatcher.recorder.Recorder`) sees every connection's frames
    and completions, in the order they are handled.
    """

    def __init__(
        self,
        router: Router,
        *,
        deadline: float | None = 5.0,
        guest: Guest | None = None,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_jobs: int = DEFAULT_MAX_JOBS,
        on_hung: Callable[[str], None] | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        if max_elements < 1:
            raise ValueError(f"max_elements must be at least 1, not {max_elements}")
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, not {max_queued}")
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be at least 1, not {max_jobs}")
        self.router = router
        self.deadline = deadline
        self.guest = guest
        self.max_elements = max_elements
        self.max_queued = max_queued
        self.max_jobs = max_jobs
        self.on_hung = on_hung
        self.observer = observer
        self.stats = EngineStats()
        """Counts of every connection's intercepts: completed, failed, unclaimed accesses, per port."""
        self.lock = threading.RLock()
        """The VM's device lock: all of this Dispatcher's device code runs holding it.

        Synchronous handlers (on whichever thread the intercept arrived),
        engine bookkeeping, and async handlers (held while their coroutine
        runs, released at each await) all take it, so a VM's devices never
        run on two threads at once. Code a machine runs on its own (timers,
        interrupt acknowledge) must take it too. Never hold it while waiting
        for the event loop.
        """
        self._stopping = False
        self._connections: set[_Connection] = set()
        self._reads: set[anyio.CancelScope] = set()
        self._stop_readers: set[Callable[[], object]] = set()

    @property
    def queued(self) -> int:
        """Frames waiting behind busy VPs now, over all connections (each bounded by ``max_queued``)."""
        return sum(connection.engine.queued for connection in list(self._connections))

    @property
    def jobs(self) -> int:
        """Async handler calls outstanding now, over all connections (each bounded by ``max_jobs``)."""
        return sum(connection.jobs for connection in list(self._connections))

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
        for stop_reading in list(self._stop_readers):
            stop_reading()

    async def serve(
        self,
        transport: Transport,
        *,
        partition: int | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Dispatch every frame ``transport`` delivers until it closes or :meth:`stop` is called.

        With ``partition``, the connection serves that partition (a VM) only:
        frames of another are refused with a PROTOCOL_ERROR completion.

        A transport that :attr:`~dispatcher.Transport.answers_inline` runs
        synchronous handlers on its own thread; jobs (async handlers) come
        to this loop. If a synchronous handler there passes the deadline
        without returning, a watchdog answers its intercept
        DEADLINE_EXCEEDED (after the completions already made for the
        frames before it), abandons that thread (whatever it returns later
        is dropped), ends the connection and calls ``on_hung``: the thread
        still holds the VM's lock, so the VM's process should exit and be
        replaced.

        Closes the transport before returning. Signals readiness through
        ``task_status`` (use it with ``TaskGroup.start``).
        """
        engine = Engine(
            self.router,
            deadline=self.deadline,
            stats=self.stats,
            guest=transport.guest or self.guest,
            max_elements=self.max_elements,
            partition=partition,
            observer=self.observer,
        )
        connection = _Connection(engine, self.max_queued, self.max_jobs)
        self._connections.add(connection)
        lock = self.lock
        pause = anyio.lowlevel.checkpoint
        send_lock = anyio.Lock(fast_acquire=True)

        async def send(frames: Sequence[bytes]) -> None:
            async with send_lock:
                await transport.send_batch(frames)

        def job_done() -> None:
            connection.jobs -= 1
            check_drained()

        def check_drained() -> None:
            connection.blocked = connection.over()
            if not connection.blocked:
                with connection.drained:
                    connection.drained.notify_all()
                if connection.loop_drained is not None:
                    connection.loop_drained.set()
                    connection.loop_drained = None

        def mark_sent(number: int) -> None:
            # Sends may finish out of number order (each is its own task):
            # ``sent`` only passes a number once every one before it is out.
            done = connection.done
            done.add(number)
            if number == connection.sent + 1:
                with connection.sent_changed:
                    sent = connection.sent
                    while sent + 1 in done:
                        sent += 1
                        done.discard(sent)
                    connection.sent = sent
                    connection.sent_changed.notify_all()

        async def run(job: Job | None) -> None:
            try:
                while job is not None:
                    results: list[object] = []
                    status, error = Status.COMPLETED, None
                    with anyio.move_on_after(self.deadline if self.deadline is not None else float("inf")) as scope:
                        try:
                            for step in job.steps:
                                claim = step.claim
                                if claim is None:
                                    results.append(None)
                                    continue
                                await Acquire(lock, pause)
                                try:
                                    called = call_step(step)
                                finally:
                                    lock.release()
                                if claim.is_async:
                                    called = await LockedSteps(cast(Awaitable[object], called), lock, pause)
                                results.append(called)
                        except Exception as exc:
                            status, error = Status.HANDLER_FAILED, exc
                    if scope.cancelled_caught:
                        status = Status.DEADLINE_EXCEEDED
                    await Acquire(lock, pause)
                    try:
                        out, more = engine.finish(job, results, status, error)
                        connection.finished += 1
                        number = connection.finished
                    finally:
                        lock.release()
                    check_drained()
                    try:
                        await send(out)
                    finally:
                        mark_sent(number)
                    job = more[0] if more else None
            finally:
                job_done()

        # A transport that can stop reading by itself needs no cancel scope per
        # read, which costs more than the rest of a small batch's round trip.
        stop_reading = transport.stop_reading if transport.stops_reading else None
        if stop_reading is not None:
            self._stop_readers.add(stop_reading)
            if self._stopping:
                stop_reading()
        try:
            async with anyio.create_task_group() as tg:

                def start_jobs(jobs: list[Job]) -> None:
                    for job in jobs:
                        tg.start_soon(run, job)

                async def send_then_run(out: list[bytes], number: int, jobs: list[Job]) -> None:
                    # An inline batch that made jobs: its completions go out before
                    # any of theirs can (they may be of the same VP).
                    try:
                        await send(out)
                    finally:
                        mark_sent(number)
                    start_jobs(jobs)

                watchdog_scope = anyio.CancelScope()
                if transport.answers_inline:
                    transport.start_inline(self._inline_answer(connection, send_then_run, tg))
                    if transport.answers_decoded and self.observer is None:
                        transport.start_decoded(self._decoded_answer(connection))
                    if self.deadline is not None:
                        tg.start_soon(self._watchdog, connection, transport, tg.cancel_scope, watchdog_scope)
                task_status.started()
                while True:
                    if connection.over():
                        connection.loop_drained = anyio.Event()
                        await connection.loop_drained.wait()
                    if stop_reading is not None:
                        frames = await transport.receive_batch()
                    elif self._stopping:
                        break
                    else:
                        with anyio.CancelScope() as read_scope:
                            self._reads.add(read_scope)
                            try:
                                frames = await transport.receive_batch()
                            finally:
                                self._reads.discard(read_scope)
                        if read_scope.cancelled_caught:
                            break
                    if not frames:
                        break
                    await Acquire(lock, pause)
                    try:
                        out, jobs = engine.receive(frames)
                        connection.jobs += len(jobs)
                    finally:
                        lock.release()
                    start_jobs(jobs)
                    if out:
                        await send(out)
                connection.ended = True
                # Nothing more runs on the transport's thread: the jobs still finish, unwatched.
                watchdog_scope.cancel()
        except* TransportError as group:
            # The task group wraps errors in an ExceptionGroup, whether the read loop or a job's send raised them.
            # Each distinct message once: the read loop and several jobs' sends often fail alike.
            log.warning("connection lost: %s", "; ".join(dict.fromkeys(str(error) for error in group.exceptions)))
        finally:
            connection.ended = True
            with connection.drained:
                connection.drained.notify_all()
            with connection.sent_changed:
                connection.sent_changed.notify_all()
            self._connections.discard(connection)
            if stop_reading is not None:
                self._stop_readers.discard(stop_reading)
            with anyio.CancelScope(shield=True):
                await transport.aclose()

    def _inline_answer(
        self,
        connection: _Connection,
        send_then_run: Callable[[list[bytes], int, list[Job]], Coroutine[Any, Any, None]],
        tg: anyio.abc.TaskGroup,
    ) -> Callable[[Sequence[bytes]], list[bytes]]:
        # The function an inline transport calls on its own thread.
        token = anyio.lowlevel.current_token()
        acquire, release = self.lock.acquire, self.lock.release
        receive = connection.engine.receive
        calls = connection.calls
        watched = self.deadline is not None
        get_ident = threading.get_ident
        clock = time.perf_counter

        def hand_over(out: list[bytes], number: int, jobs: list[Job]) -> None:
            # On the loop: send, then start the jobs, unless the connection has already ended.
            if connection.ended:
                connection.jobs -= len(jobs)
                return
            tg.start_soon(send_then_run, out, number, jobs)

        def answer(frames: Sequence[bytes]) -> list[bytes]:
            if connection.blocked:
                with connection.drained:
                    connection.drained.wait_for(lambda: connection.ended or not connection.over())
            out: list[bytes] = []
            acquire()  # not ``with lock``: this runs once per intercept, and ``with`` costs twice as much
            try:
                if connection.ended:
                    return []
                if watched:
                    # The watchdog answers a handler that passes the deadline, at
                    # the deadline: the engine need not time them (watched=True).
                    # It may claim this call (pop it); whoever pops it first
                    # answers for the batch.
                    ident = get_ident()
                    calls[ident] = (clock(), out)
                    try:
                        out, jobs = receive(frames, out, True)
                    finally:
                        claimed = calls.pop(ident, None) is not None
                    if not claimed:
                        return []  # the watchdog answered: exactly one completion each
                else:
                    out, jobs = receive(frames, out)
                finished = connection.finished
                if jobs:
                    connection.jobs += len(jobs)
                    connection.finished += 1
                    number = connection.finished
                if connection.jobs:
                    connection.blocked = connection.over()
            finally:
                release()
            if jobs:
                # Not holding the lock: the loop may need it to run what it is doing now.
                try:
                    anyio.from_thread.run_sync(hand_over, out, number, jobs, token=token)
                except (anyio.RunFinishedError, RuntimeError):
                    log.warning("%d async handler calls dropped: the event loop has stopped", len(jobs))
                return []
            if connection.sent < finished:
                # A job's completion (made before these) is still on its way
                # out: a VP's completions leave in the order they were made.
                connection.wait_sent(finished)
            return out

        return answer

    def _decoded_answer(self, connection: _Connection) -> DecodedAnswer:
        # The function an inline transport that decodes intercepts itself calls on its own thread: the inline
        # answer's bookkeeping around Engine.answer_port. None (take the frame path) where that has more to do.
        acquire, release = self.lock.acquire, self.lock.release
        answer_port = connection.engine.answer_port
        calls = connection.calls
        watched = self.deadline is not None
        get_ident = threading.get_ident
        clock = time.perf_counter

        def answer(
            partition: int, vp: int, port: int, access_info: int, is_write: bool, rax: int, next_rip: int
        ) -> int | bytes | None:
            if connection.blocked:
                return None
            acquire()
            try:
                if connection.ended:
                    return None
                if watched:
                    ident = get_ident()
                    calls[ident] = (clock(), [])
                    try:
                        result = answer_port(partition, vp, port, access_info, is_write, rax, next_rip)
                    finally:
                        claimed = calls.pop(ident, None) is not None
                    if not claimed:
                        return None  # the watchdog has ended the connection: the frame path finds it ended
                else:
                    result = answer_port(partition, vp, port, access_info, is_write, rax, next_rip)
                finished = connection.finished
            finally:
                release()
            if connection.sent < finished:
                connection.wait_sent(finished)
            return result

        return answer

    async def _watchdog(
        self, connection: _Connection, transport: Transport, scope: anyio.CancelScope, own: anyio.CancelScope
    ) -> None:
        with own:
            await self._watch(connection, transport, scope)

    async def _watch(self, connection: _Connection, transport: Transport, scope: anyio.CancelScope) -> None:
        # Notices a synchronous handler that has run past the deadline on a transport's thread.
        deadline = cast(float, self.deadline)
        idle = min(max(deadline / 4, 0.01), 0.5)
        calls = connection.calls
        while True:
            oldest = min(calls.items(), key=lambda item: item[1][0], default=None)
            if oldest is None:
                await anyio.sleep(idle)
                continue
            thread, (started, made) = oldest
            remaining = started + deadline - time.perf_counter()
            if remaining > 0:
                await anyio.sleep(remaining)
                continue
            if calls.pop(thread, None) is None:
                continue  # it returned just now
            connection.ended = True
            out = list(made)
            frame, ids = _current_intercept(thread)
            description = f"{_name(transport)}: a synchronous handler has run past the {deadline:g} s deadline"
            if frame is not None:
                out.append(connection.engine.abandoned(frame))
            elif ids is not None:
                # A decoded intercept: the stuck thread is the one that would apply a completion; none is sent.
                self.stats.deadline_exceeded += 1
            if ids is not None:
                description += f" (partition {ids[0]}, VP {ids[1]}); its thread is abandoned"
            log.error("%s; ending the connection", description)
            try:
                if out:
                    with anyio.move_on_after(deadline):
                        await transport.send_batch(out)
            except TransportError as error:
                log.warning("%s: could not send the deadline completion: %s", _name(transport), error)
            finally:
                with connection.drained:
                    connection.drained.notify_all()
                scope.cancel()
                if self.on_hung is not None:
                    self.on_hung(description)
            return


def _current_intercept(thread: int) -> tuple[bytes | None, tuple[int, int] | None]:
    # The intercept the hung thread's engine call is handling, read from its stack: its frame (None for a decoded
    # intercept, which has none: its thread is the one that would apply a completion, and it is stuck) and its
    # partition and VP.
    stack: FrameType | None = sys._current_frames().get(thread)
    while stack is not None:
        if stack.f_code is _RECEIVE_CODE:
            frame = stack.f_locals.get("frame")
            return (frame, frame_ids(frame)) if isinstance(frame, bytes) else (None, None)
        if stack.f_code is _ANSWER_PORT_CODE:
            partition, vp = stack.f_locals.get("partition"), stack.f_locals.get("vp")
            return None, (partition, vp) if isinstance(partition, int) and isinstance(vp, int) else None
        stack = stack.f_back
    return None, None


def _name(transport: Transport) -> str:
    name = getattr(transport, "name", None)
    return name if isinstance(name, str) else type(transport).__name__
