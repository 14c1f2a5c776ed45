"""Running an async handler under a VM's device lock, released at each of its awaits.

A VM's device code runs holding one :class:`threading.RLock` (the
:attr:`~dispatcher.Dispatcher.lock`): synchronous handlers on the threads
where intercepts arrive, async handlers on the event loop. An async handler
must not hold it across an await (the lock would then be held while waiting
for the loop, and a handler on another thread would wait for that), so
:class:`LockedSteps` steps the coroutine: it takes the lock, runs the
coroutine up to its next suspension, releases the lock, and passes what the
coroutine yielded to the event loop unchanged. It is a plain generator, so
it works on any event loop (asyncio and trio alike).

The event loop's thread never blocks for long on the lock: it tries for
:data:`LOCK_SLICE` seconds, then lets the loop run (``pause``) and tries
again, so other connections and a watchdog keep running while a
synchronous handler elsewhere holds the lock.

Nothing here imports anyio; the caller supplies ``pause``.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, TypeVar

__all__ = ["LOCK_SLICE", "Acquire", "LockedSteps", "Pause", "acquire_on_loop"]

_T = TypeVar("_T")

LOCK_SLICE = 0.0005
"""The longest the event loop's thread blocks on a busy lock before letting the loop run."""

Pause = Callable[[], Awaitable[None]]
"""The event loop's checkpoint, awaited while the lock is busy (``anyio.lowlevel.checkpoint``)."""


def acquire_on_loop(lock: threading.RLock | threading.Lock, pause: Pause) -> Generator[Any, Any, None]:
    """Take ``lock`` from the event loop's thread: ``yield from`` it inside a generator-based awaitable.

    Blocks the thread at most :data:`LOCK_SLICE` seconds at a time, awaiting
    ``pause()`` in between.
    """
    while not lock.acquire(timeout=LOCK_SLICE):
        yield from pause().__await__()


class Acquire:
    """``await Acquire(lock, pause)`` takes ``lock`` on the event loop's thread (see :func:`acquire_on_loop`)."""

    __slots__ = ("_lock", "_pause")

    def __init__(self, lock: threading.RLock | threading.Lock, pause: Pause) -> None:
        self._lock = lock
        self._pause = pause

    def __await__(self) -> Generator[Any, Any, None]:
        if not self._lock.acquire(blocking=False):
            yield from acquire_on_loop(self._lock, self._pause)


class LockedSteps(Generic[_T]):
    """Await ``awaitable`` with ``lock`` held while it runs and released while it waits.

    ``pause`` is the event loop's checkpoint (``anyio.lowlevel.checkpoint``),
    awaited while the lock is busy. An exception the loop throws in (a
    cancellation) is delivered to the awaitable under the lock, as a result
    would be.
    """

    __slots__ = ("_awaitable", "_lock", "_pause")

    def __init__(self, awaitable: Awaitable[_T], lock: threading.RLock, pause: Pause) -> None:
        self._awaitable = awaitable
        self._lock = lock
        self._pause = pause

    def __await__(self) -> Generator[Any, Any, _T]:
        inner = self._awaitable.__await__()
        lock, pause = self._lock, self._pause
        value: Any = None
        error: BaseException | None = None
        try:
            while True:
                if not lock.acquire(blocking=False):
                    yield from acquire_on_loop(lock, pause)
                try:
                    yielded = inner.send(value) if error is None else inner.throw(error)
                except StopIteration as stop:
                    result: _T = stop.value
                    return result
                finally:
                    lock.release()
                try:
                    value, error = (yield yielded), None
                except BaseException as caught:  # delivered to the coroutine, which decides
                    value, error = None, caught
        finally:
            # Abandoned part-way (the loop closed us, or a wait for the lock
            # was cancelled): close the coroutine so its cleanup runs.
            close = getattr(inner, "close", None)
            if close is not None:
                held = lock.acquire(timeout=LOCK_SLICE)
                try:
                    close()
                finally:
                    if held:
                        lock.release()
