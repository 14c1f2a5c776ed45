"""A conformance suite for transports: does a :class:`~dispatcher.Transport` carry the protocol as a Dispatcher needs?

A transport author writes one async context manager that yields a fresh,
connected pair of ends, ``(service_side, vmm_side)``, and hands it to
:func:`check_transport`::

    import socket
    from contextlib import asynccontextmanager

    import pytest

    from transports.conformance import check_transport
    from transports.unix import UnixTransport


    @asynccontextmanager
    async def socket_pair():
        a, b = socket.socketpair()
        service, vmm = UnixTransport(a), UnixTransport(b)
        try:
            yield service, vmm
        finally:
            await service.aclose()
            await vmm.aclose()


    @pytest.mark.anyio
    async def test_unix_transport_conforms():
        await check_transport(socket_pair)

``connect`` is called once per check and must give a new pair each time.
A :class:`~dispatcher.Dispatcher` serves the first end (the service side)
with a router of test devices; the check drives the second end as a VMM
would, with I/O port intercept frames, and reads the completions. The
checks close ends themselves; the context manager closes both again on
exit, which the Transport contract makes harmless. Each check is also a
function of its own (:data:`CHECKS` lists them), for a test per check.

The checks, each failing with an ``AssertionError`` that names the check
and what the transport got wrong:

- :func:`check_per_vp_order`: many intercepts from eight VPs in two
  partitions, interleaved and sent in batches of varied sizes, come back
  in order per VP, and each VP's reads see its own earlier writes (so the
  service also received them in order).
- :func:`check_batching`: frames sent in one ``send_batch`` arrive intact
  and in order, in both directions, and ``receive_batch`` returns more than
  one of them at a time; a batch of intercepts sent at once is all
  answered. A transport whose documentation says ``receive_batch`` delivers
  one frame per call (one per datagram, say) passes ``batches=False``:
  every frame must still arrive, in order, but one at a time is accepted.
- :func:`check_one_completion_each`: every intercept (synchronous, async,
  failing and unclaimed ports) gets exactly one completion, counted by
  partition, VP and the sequence number carried in RIP; nothing more
  arrives before end of stream, and the service counted each intercept
  once.
- :func:`check_stop_with_intercepts_in_flight`: :meth:`~dispatcher.Dispatcher.stop`
  while async handlers are running and later intercepts of their VPs are
  queued: every one is answered, then ``serve()`` returns, the VMM side
  sees end of stream and the service side is closed (sending on it raises
  ``TransportClosedError``).
- :func:`check_stop_when_idle`: ``stop()`` while ``serve()`` waits in
  ``receive_batch`` makes it return (for a transport with
  ``stops_reading``, ``stop_reading()`` must wake that read).
- :func:`check_peer_closes_when_idle` and
  :func:`check_peer_closes_with_intercept_in_flight`: closing the VMM side
  makes ``serve()`` return without raising, also when a completion is
  still to be sent (its send must fail with a ``TransportError``, which
  ``serve()`` handles, not any other exception).
- :func:`check_malformed_frames`: frames a stream can delimit but that are
  not valid intercepts (an unknown message type, an access type of 2, an
  access size of 3) each get a PROTOCOL_ERROR completion whose detail is
  the offending byte offset, and the frames after them are served.
- :func:`check_handler_failures`: a synchronous or async handler that
  raises gives HANDLER_FAILED (the instruction still completes: RIP
  advances, a read gets all ones), and the VP's next intercepts are served.
- :func:`check_send_to_gone_peer`: once one end is closed, the other's
  ``receive_batch`` returns ``[]`` and its ``send_batch`` raises
  ``TransportClosedError``; an end's own ``send_batch`` after its
  ``aclose()`` raises it too, and closing twice is harmless.

Every check also requires that nothing outlives the pair: no task started
during the check is still running once the context manager has exited, no
thread started during it is still running soon after (a thread may take a
moment to return once told to end; the wait is bounded), and (where
``/proc/self/fd`` exists) no file descriptor opened during it is still
open.

A transport that declares :attr:`~dispatcher.Transport.answers_inline` is
served inline, as a Dispatcher always serves it: its own thread calls the
dispatcher's answer function and sends the completions, the loop sends
those of async handlers, and every check above holds for it too (order
across the two senders, exactly one completion, graceful stop, a closed
peer, nothing leaked, the reader thread included).

Every wait is bounded (10 seconds), so a broken transport fails rather
than hangs; nothing is asserted about speed. The Dispatcher runs without a
handler deadline.

Not covered: frames whose header cannot be delimited (PayloadSize over
240). A byte stream cannot find the next frame after one and ends the
connection, which is its documented behaviour, while a transport that
carries whole frames delivers it to be rejected; the two are both right.
The KVM transport (:mod:`transports.kvm`) is not a frame pair: its frames
come from a vCPU's exits, not from a peer end, so it cannot be checked
here; its guest tests cover it.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any, NoReturn, ParamSpec

import anyio
import anyio.abc
import anyio.lowlevel

from dispatcher import (
    AccessInfo,
    AccessType,
    Completion,
    Dispatcher,
    FrameError,
    IoPortInterceptMessage,
    PortAccess,
    Registers,
    Router,
    Status,
    Transport,
    TransportClosedError,
    decode_completion,
)
from dispatcher.wire import Offset

__all__ = [
    "CHECKS",
    "TIMEOUT",
    "Connect",
    "check_batching",
    "check_handler_failures",
    "check_malformed_frames",
    "check_one_completion_each",
    "check_peer_closes_when_idle",
    "check_peer_closes_with_intercept_in_flight",
    "check_per_vp_order",
    "check_send_to_gone_peer",
    "check_stop_when_idle",
    "check_stop_with_intercepts_in_flight",
    "check_transport",
]

TIMEOUT = 10.0
"""Seconds any one wait may take before the check fails."""

Connect = Callable[[], AbstractAsyncContextManager[tuple[Transport, Transport]]]
"""Makes a fresh connected pair of ends: ``async with connect() as (service_side, vmm_side)``."""

# The test devices' ports. Every access is a doubleword, so each device spans four ports.
SIZE = 4
SCRATCH = 0x510  # a per-VP scratch register, synchronous
ASYNC_SCRATCH = 0x514  # the same register through an async handler
FAILING = 0x518  # a synchronous handler that raises
ASYNC_FAILING = 0x51C  # an async handler that raises
SLOW = 0x520  # an async handler that waits until the check releases it
UNCLAIMED = 0x524

# The VPs that send: eight, over two partitions.
VPS = [(partition, vp) for partition in (0, 1) for vp in range(4)]

Key = tuple[int, int, int]
"""An intercept's identity: partition, VP index and the sequence number carried in its RIP."""

P = ParamSpec("P")


class _Devices:
    """The router a check serves, and the state of its devices."""

    def __init__(self) -> None:
        self.router = Router()
        self.values: dict[tuple[int, int], int] = {}
        self.release = anyio.Event()
        self.entered = 0
        self._entered_changed = anyio.Event()
        self.router.add(self._scratch, SCRATCH, SIZE)
        self.router.add(self._async_scratch, ASYNC_SCRATCH, SIZE)
        self.router.add(self._failing, FAILING, SIZE)
        self.router.add(self._async_failing, ASYNC_FAILING, SIZE)
        self.router.add(self._slow, SLOW, SIZE)

    def _scratch(self, access: PortAccess) -> int | None:
        key = (access.partition, access.vp_index)
        if access.is_write:
            self.values[key] = access.value
            return None
        return self.values.get(key, 0)

    async def _async_scratch(self, access: PortAccess) -> int | None:
        # A VP-dependent number of checkpoints, so different VPs' async work interleaves.
        for _ in range(1 + access.vp_index % 3):
            await anyio.lowlevel.checkpoint()
        return self._scratch(access)

    def _failing(self, access: PortAccess) -> int | None:
        raise RuntimeError("the conformance suite's failing device")

    async def _async_failing(self, access: PortAccess) -> int | None:
        await anyio.lowlevel.checkpoint()
        raise RuntimeError("the conformance suite's failing async device")

    async def _slow(self, access: PortAccess) -> int | None:
        self.entered += 1
        self._entered_changed.set()
        await self.release.wait()
        return self._scratch(access)

    async def wait_entered(self, count: int) -> None:
        """Wait until ``count`` slow handlers have started."""
        while self.entered < count:
            self._entered_changed = anyio.Event()
            await self._entered_changed.wait()


def _intercept(partition: int, vp: int, seq: int, port: int, *, write: bool, value: int = 0) -> bytes:
    # Real mode with a one-byte instruction: the completion's RIP is seq + 1.
    return IoPortInterceptMessage(
        port_number=port,
        access_type=AccessType.WRITE if write else AccessType.READ,
        access_info=AccessInfo.build(SIZE),
        rax=value if write else 0,
        vp_index=vp,
        source_partition=partition,
        rip=seq,
    ).to_bytes()


def _value(partition: int, vp: int, seq: int) -> int:
    """What a VP writes at ``seq``: unique per VP, so a read shows whose write it saw."""
    return partition << 24 | vp << 16 | seq


def _fail(check: str, message: str) -> NoReturn:
    raise AssertionError(f"{check}: {message}")


@contextmanager
def _within(check: str, what: Callable[[], str] | str) -> Iterator[None]:
    """Fail the check, saying what did not happen, if the block takes longer than :data:`TIMEOUT`."""
    try:
        with anyio.fail_after(TIMEOUT):
            yield
    except TimeoutError:
        _fail(check, f"{what() if callable(what) else what} (waited {TIMEOUT:g} s)")


def _first_failure(error: BaseException) -> AssertionError | None:
    if isinstance(error, AssertionError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _first_failure(inner)
            if found is not None:
                return found
    return None


def _conformance_check(func: Callable[P, Awaitable[None]]) -> Callable[P, Coroutine[Any, Any, None]]:
    """Report a failed check as its own AssertionError, not wrapped in the task groups' exception groups."""

    @functools.wraps(func)
    async def check(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            await func(*args, **kwargs)
        except BaseExceptionGroup as group:
            failure = _first_failure(group)
            if failure is None:
                raise
            raise failure from None

    return check


_THREAD_POOLS = ("AnyIO worker", "Trio thread")


def _new_threads(before: set[threading.Thread]) -> list[str]:
    # anyio's and trio's worker threads are pools that outlive any one use of them.
    return [
        thread.name
        for thread in threading.enumerate()
        if thread not in before and thread.is_alive() and not thread.name.startswith(_THREAD_POOLS)
    ]


def _open_fds() -> set[int] | None:
    try:
        listed = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return None
    # The listing includes the descriptor that read the directory, closed since.
    return {fd for fd in listed if _is_open(fd)}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _describe_fd(fd: int) -> str:
    try:
        return f"{fd} ({os.readlink(f'/proc/self/fd/{fd}')})"
    except OSError:
        return str(fd)


@asynccontextmanager
async def _connected(check: str, connect: Connect) -> AsyncIterator[tuple[Transport, Transport]]:
    """A fresh pair from ``connect``; afterwards, fail if a task or descriptor outlived it."""
    tasks = {task.id for task in anyio.get_running_tasks()}
    threads = set(threading.enumerate())
    fds = _open_fds()
    with _within(check, "connect() did not yield a pair"):
        manager = connect()
        pair = await manager.__aenter__()
    try:
        yield pair
    except BaseException as error:
        if not await manager.__aexit__(type(error), error, error.__traceback__):
            raise
    else:
        with _within(check, "connect()'s context manager did not exit"):
            await manager.__aexit__(None, None, None)
    await anyio.lowlevel.checkpoint()
    left = [task.name for task in anyio.get_running_tasks() if task.id not in tasks]
    if left:
        _fail(check, f"tasks still running after the pair was closed: {left}")
    with _within(check, lambda: f"threads still running after the pair was closed: {_new_threads(threads)}"):
        while _new_threads(threads):
            await anyio.sleep(0.001)
    now = _open_fds()
    if fds is not None and now is not None and now - fds:
        leaked = ", ".join(_describe_fd(fd) for fd in sorted(now - fds))
        _fail(check, f"file descriptors still open after the pair was closed: {leaked}")


class _Serving:
    """One ``Dispatcher.serve`` call over the service side, run in a task the check watches."""

    def __init__(self, check: str, devices: _Devices, transport: Transport) -> None:
        self.check = check
        self.devices = devices
        self.transport = transport
        self.dispatcher = Dispatcher(devices.router, deadline=None)
        self.done = anyio.Event()
        self.error: Exception | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.dispatcher.serve(self.transport, task_status=task_status)
        except Exception as error:
            self.error = error
        finally:
            self.done.set()

    async def returned(self, after: str) -> None:
        """Wait for ``serve()`` to return, and fail if it raised."""
        with _within(self.check, f"serve() did not return after {after}"):
            await self.done.wait()
        if self.error is not None:
            _fail(
                self.check,
                f"serve() raised {self.error!r} after {after}; a transport reports a gone peer as "
                "TransportClosedError (a TransportError), which serve() handles",
            )


@asynccontextmanager
async def _serve(check: str, devices: _Devices, transport: Transport) -> AsyncIterator[_Serving]:
    serving = _Serving(check, devices, transport)
    async with anyio.create_task_group() as tg:
        with _within(check, "serve() did not signal it had started"):
            await tg.start(serving.run)
        try:
            yield serving
        finally:
            # The check has what it needs (or has failed): end serve() now.
            devices.release.set()
            tg.cancel_scope.cancel()


def _decode(check: str, frame: bytes) -> Completion:
    try:
        return decode_completion(frame)
    except FrameError as error:
        _fail(check, f"the VMM side received a frame that is not a completion ({error}): {frame[:32].hex()}...")


def _sequence(completion: Completion) -> int | None:
    if not completion.registers & Registers.RIP:
        return None
    return (completion.rip - 1) & 0xFFFF


def _describe(completion: Completion) -> str:
    return (
        f"partition {completion.source_partition} VP {completion.vp_index} sequence {_sequence(completion)} "
        f"({completion.status.name})"
    )


async def _send_batches(vmm: Transport, batches: Sequence[Sequence[bytes]]) -> None:
    for batch in batches:
        await vmm.send_batch(batch)


async def _receive(check: str, vmm: Transport, count: int, sizes: list[int] | None = None) -> list[Completion]:
    """Receive ``count`` completions on the VMM side (noting each batch's size in ``sizes``)."""
    got: list[Completion] = []
    with _within(check, lambda: f"only {len(got)} of {count} completions arrived"):
        while len(got) < count:
            frames = await vmm.receive_batch()
            if not frames:
                _fail(check, f"the VMM side reached end of stream after {len(got)} of {count} completions")
            if sizes is not None:
                sizes.append(len(frames))
            got += [_decode(check, frame) for frame in frames]
    return got


async def _exchange(check: str, vmm: Transport, batches: Sequence[Sequence[bytes]], count: int) -> list[Completion]:
    """Send the batches while receiving ``count`` completions (so neither direction's buffer can fill up)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_send_batches, vmm, batches)
        completions = await _receive(check, vmm, count)
    return completions


async def _drain(check: str, vmm: Transport) -> list[Completion]:
    """Receive until end of stream; return what arrived."""
    got: list[Completion] = []
    with _within(check, "the VMM side never saw end of stream after serve() closed the service side"):
        while frames := await vmm.receive_batch():
            got += [_decode(check, frame) for frame in frames]
    return got


def _match(check: str, sent: Sequence[Key], completions: Sequence[Completion]) -> dict[Key, Completion]:
    """Pair completions with intercepts; fail on one never sent, one answered twice, or one not answered."""
    expected = set(sent)
    seen: dict[Key, Completion] = {}
    for completion in completions:
        seq = _sequence(completion)
        key = (completion.source_partition, completion.vp_index, -1 if seq is None else seq)
        if key not in expected:
            _fail(check, f"a completion for an intercept that was never sent: {_describe(completion)}")
        if key in seen:
            _fail(check, f"two completions for one intercept: {_describe(completion)}")
        seen[key] = completion
    missing = sorted(expected - seen.keys())
    if missing:
        _fail(check, f"{len(missing)} of {len(expected)} intercepts got no completion, e.g. {missing[:5]}")
    return seen


def _chunks(frames: Sequence[bytes], sizes: Sequence[int]) -> list[list[bytes]]:
    """Cut frames into batches whose sizes cycle through ``sizes``."""
    batches: list[list[bytes]] = []
    at = 0
    while at < len(frames):
        size = sizes[len(batches) % len(sizes)]
        batches.append(list(frames[at : at + size]))
        at += size
    return batches


async def _expect_closed_send(check: str, transport: Transport, why: str) -> None:
    """``transport.send_batch`` must raise TransportClosedError (at once, or once the peer's going shows)."""
    frame = _intercept(0, 0, 0, SCRATCH, write=True)
    with _within(check, f"send_batch kept succeeding {why}"):
        while True:
            try:
                await transport.send_batch([frame])
            except TransportClosedError:
                return
            except Exception as error:
                _fail(check, f"send_batch raised {error!r} {why}; the Transport contract is TransportClosedError")
            await anyio.lowlevel.checkpoint()


# --- the checks ---------------------------------------------------------------------------------


@_conformance_check
async def check_per_vp_order(connect: Connect) -> None:
    """Completions come back in order per VP, and each VP's frames reach the service in order."""
    check = "per-VP order"
    per_vp = 48
    sent: list[Key] = []
    frames: list[bytes] = []
    for seq in range(per_vp):
        for partition, vp in VPS:
            # Write, read back, async write, async read: a read returns the write just before it.
            port = SCRATCH if seq % 4 < 2 else ASYNC_SCRATCH
            write = seq % 2 == 0
            frames.append(_intercept(partition, vp, seq, port, write=write, value=_value(partition, vp, seq)))
            sent.append((partition, vp, seq))
    devices = _Devices()
    async with _connected(check, connect) as (service, vmm), _serve(check, devices, service):
        completions = await _exchange(check, vmm, _chunks(frames, (1, 5, 17, 64, 3, 40)), len(frames))
    _match(check, sent, completions)
    order: dict[tuple[int, int], list[int]] = defaultdict(list)
    for completion in completions:
        order[completion.source_partition, completion.vp_index].append(_sequence(completion) or 0)
        if completion.status is not Status.COMPLETED:
            _fail(check, f"a scratch register access completed with {completion.status.name}: {_describe(completion)}")
    for (partition, vp), seqs in sorted(order.items()):
        if seqs != sorted(seqs):
            _fail(
                check,
                f"partition {partition} VP {vp}: completions arrived in the order {seqs}; "
                "one VP's frames must be delivered in the order they were sent",
            )
    for completion in completions:
        seq = _sequence(completion) or 0
        if seq % 2 and completion.rax != _value(completion.source_partition, completion.vp_index, seq - 1):
            _fail(
                check,
                f"{_describe(completion)} read {completion.rax:#x}, not the value written just before it "
                f"({_value(completion.source_partition, completion.vp_index, seq - 1):#x}): "
                "the service received this VP's frames out of order",
            )


@_conformance_check
async def check_batching(connect: Connect, *, batches: bool = True) -> None:
    """Frames sent in one batch arrive intact, in order and (if ``batches``) more than one per receive."""
    check = "batching"
    count = 16
    intercepts = [_intercept(partition, vp, 0, SCRATCH, write=False) for partition, vp in VPS] * (count // len(VPS))
    completions = [
        Completion(vp, Status.COMPLETED, Registers.RIP, 1, source_partition=partition).to_bytes()
        for partition, vp in VPS
    ] * (count // len(VPS))

    async def carry(sender: Transport, receiver: Transport, frames: list[bytes], direction: str) -> None:
        got: list[bytes] = []
        sizes: list[int] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender.send_batch, frames)
            with _within(check, lambda: f"{direction}: {len(got)} of {len(frames)} frames of one batch arrived"):
                while len(got) < len(frames):
                    batch = await receiver.receive_batch()
                    if not batch:
                        _fail(check, f"{direction}: end of stream after {len(got)} of {len(frames)} frames")
                    sizes.append(len(batch))
                    got += batch
        if got != frames:
            _fail(check, f"{direction}: the frames received differ from those sent (lost, reordered or altered)")
        if batches and max(sizes) == 1:
            _fail(
                check,
                f"{direction}: {len(frames)} frames sent in one send_batch came out of receive_batch one at a "
                "time; receive_batch must return every frame that is ready (a transport documented to deliver "
                "one frame per receive passes batches=False)",
            )

    async with _connected(check, connect) as (service, vmm):
        await carry(vmm, service, intercepts, "VMM to service")
        await carry(service, vmm, completions, "service to VMM")

    # Served: a batch of intercepts sent at once is all answered.
    sent = [(partition, vp, seq) for seq in range(16) for partition, vp in VPS]
    frames = [
        _intercept(partition, vp, seq, SCRATCH, write=seq % 2 == 0, value=_value(partition, vp, seq))
        for partition, vp, seq in sent
    ]
    sizes: list[int] = []
    async with _connected(check, connect) as (service, vmm), _serve(check, _Devices(), service):
        await vmm.send_batch(frames)
        answers = await _receive(check, vmm, len(frames), sizes)
    _match(check, sent, answers)
    if batches and max(sizes) == 1:
        _fail(
            check,
            f"the service answered {len(frames)} intercepts of one batch with one send_batch, and the VMM side "
            "received the completions one per receive_batch",
        )


@_conformance_check
async def check_one_completion_each(connect: Connect) -> None:
    """Every intercept gets exactly one completion, whatever its handler does, and nothing more arrives."""
    check = "one completion per intercept"
    ports = [SCRATCH, ASYNC_SCRATCH, FAILING, ASYNC_FAILING, UNCLAIMED]
    sent: list[Key] = []
    frames: list[bytes] = []
    for seq in range(30):
        for partition, vp in VPS:
            port = ports[(seq + vp) % len(ports)]
            frames.append(_intercept(partition, vp, seq, port, write=seq % 3 == 0, value=_value(partition, vp, seq)))
            sent.append((partition, vp, seq))
    devices = _Devices()
    async with _connected(check, connect) as (service, vmm), _serve(check, devices, service) as serving:
        completions = await _exchange(check, vmm, _chunks(frames, (7, 1, 33, 90)), len(frames))
        _match(check, sent, completions)
        serving.dispatcher.stop()
        extra = await _drain(check, vmm)
        await serving.returned("stop()")
    if extra:
        _fail(check, f"{len(extra)} completions arrived after every intercept was answered, e.g. {_describe(extra[0])}")
    counted = serving.dispatcher.stats.intercepts
    if counted != len(sent):
        _fail(check, f"the service counted {counted} intercepts for {len(sent)} sent: it received some twice or not")


@_conformance_check
async def check_stop_with_intercepts_in_flight(connect: Connect) -> None:
    """``stop()`` answers every intercept received, then ``serve()`` returns and the service side is closed."""
    check = "graceful stop with intercepts in flight"
    busy = VPS[:4]
    sent: list[Key] = []
    first: list[bytes] = []
    for partition, vp in busy:
        # A slow handler holds each VP; its later intercepts queue behind it.
        kinds = [(SLOW, False), (SCRATCH, True), (ASYNC_SCRATCH, False), (SCRATCH, False)]
        for seq, (port, write) in enumerate(kinds):
            first.append(_intercept(partition, vp, seq, port, write=write, value=_value(partition, vp, seq)))
            sent.append((partition, vp, seq))
    # The last frame is slow too: once its handler runs, every frame before it has been received.
    last_partition, last_vp = VPS[4]
    last = _intercept(last_partition, last_vp, 0, SLOW, write=False)
    sent.append((last_partition, last_vp, 0))
    devices = _Devices()
    async with _connected(check, connect) as (service, vmm):
        async with _serve(check, devices, service) as serving:
            await vmm.send_batch(first)
            await vmm.send_batch([last])
            with _within(check, lambda: f"only {devices.entered} of {len(busy) + 1} slow handlers started"):
                await devices.wait_entered(len(busy) + 1)
            serving.dispatcher.stop()
            devices.release.set()
            completions = await _drain(check, vmm)
            await serving.returned("stop()")
        _match(check, sent, completions)
        for completion in completions:
            if completion.status is not Status.COMPLETED:
                _fail(check, f"an intercept in flight at stop() completed with {_describe(completion)}")
        await _expect_closed_send(check, service, "on the service side after serve() returned (it closes it)")


@_conformance_check
async def check_stop_when_idle(connect: Connect) -> None:
    """``stop()`` while ``serve()`` waits for frames makes it return."""
    check = "graceful stop when idle"
    async with _connected(check, connect) as (service, vmm), _serve(check, _Devices(), service) as serving:
        completions = await _exchange(check, vmm, [[_intercept(0, 0, 0, SCRATCH, write=False)]], 1)
        _match(check, [(0, 0, 0)], completions)
        await anyio.lowlevel.checkpoint()
        serving.dispatcher.stop()
        # With stops_reading, the transport's stop_reading() must wake the waiting receive_batch.
        await serving.returned("stop() on an idle connection")
        extra = await _drain(check, vmm)
    if extra:
        _fail(check, f"a completion arrived for nothing sent: {_describe(extra[0])}")


@_conformance_check
async def check_peer_closes_when_idle(connect: Connect) -> None:
    """Closing the VMM side makes ``serve()`` return without an error."""
    check = "closed peer (idle)"
    async with _connected(check, connect) as (service, vmm), _serve(check, _Devices(), service) as serving:
        completions = await _exchange(check, vmm, [[_intercept(0, 0, 0, SCRATCH, write=False)]], 1)
        _match(check, [(0, 0, 0)], completions)
        await vmm.aclose()
        await serving.returned("the VMM side closed")


@_conformance_check
async def check_peer_closes_with_intercept_in_flight(connect: Connect) -> None:
    """Closing the VMM side while a completion is still to be sent: ``serve()`` returns without an error."""
    check = "closed peer (intercept in flight)"
    devices = _Devices()
    async with _connected(check, connect) as (service, vmm), _serve(check, devices, service) as serving:
        await vmm.send_batch([_intercept(0, 0, 0, SLOW, write=False), _intercept(0, 0, 1, SCRATCH, write=True)])
        with _within(check, "the slow handler never started"):
            await devices.wait_entered(1)
        await vmm.aclose()
        devices.release.set()
        await serving.returned("the VMM side closed with an intercept in flight")


@_conformance_check
async def check_malformed_frames(connect: Connect) -> None:
    """A malformed frame gets PROTOCOL_ERROR naming its offset; the frames after it are served."""
    check = "malformed frames"
    good = _intercept(0, 0, 0, SCRATCH, write=True, value=0x1234)
    unknown_type = bytearray(_intercept(0, 1, 0, SCRATCH, write=False))
    unknown_type[Offset.MESSAGE_TYPE : Offset.MESSAGE_TYPE + 4] = (0x1D00_00EE).to_bytes(4, "little")
    bad_access_type = bytearray(_intercept(0, 2, 0, SCRATCH, write=False))
    bad_access_type[Offset.ACCESS_TYPE] = 2
    bad_access_size = bytearray(_intercept(0, 3, 0, SCRATCH, write=False))
    bad_access_size[Offset.ACCESS_INFO] = 3
    batches = [
        [good, bytes(unknown_type), _intercept(0, 0, 1, SCRATCH, write=False), bytes(bad_access_type)],
        [bytes(bad_access_size), _intercept(0, 0, 2, ASYNC_SCRATCH, write=False)],
        [bytes(bad_access_type), _intercept(1, 0, 0, SCRATCH, write=False)],
    ]
    async with _connected(check, connect) as (service, vmm), _serve(check, _Devices(), service):
        completions = await _exchange(check, vmm, batches, sum(map(len, batches)))
    rejected = [c for c in completions if c.status is Status.PROTOCOL_ERROR]
    served = [c for c in completions if c.status is not Status.PROTOCOL_ERROR]
    answered = _match(check, [(0, 0, 0), (0, 0, 1), (0, 0, 2), (1, 0, 0)], served)
    for completion in served:
        if completion.status is not Status.COMPLETED:
            _fail(check, f"a well-formed frame after a malformed one completed with {_describe(completion)}")
    if answered[0, 0, 1].rax != 0x1234 or answered[0, 0, 2].rax != 0x1234:
        _fail(check, "the reads after the malformed frames did not see the write before them")
    found = Counter((c.source_partition, c.vp_index, c.detail) for c in rejected)
    wanted = Counter({(0, 1, Offset.MESSAGE_TYPE): 1, (0, 2, Offset.ACCESS_TYPE): 2, (0, 3, Offset.ACCESS_INFO): 1})
    if found != wanted:
        _fail(
            check,
            f"PROTOCOL_ERROR completions (partition, VP, offset) were {sorted(found.elements())}, "
            f"expected {sorted(wanted.elements())}",
        )


@_conformance_check
async def check_handler_failures(connect: Connect) -> None:
    """A handler that raises gives HANDLER_FAILED; the VP's next intercepts are served."""
    check = "handler failures"
    frames = [
        _intercept(0, 0, 0, FAILING, write=True, value=7),
        _intercept(0, 0, 1, FAILING, write=False),
        _intercept(0, 0, 2, ASYNC_FAILING, write=False),
        _intercept(0, 0, 3, SCRATCH, write=True, value=0x55),
        _intercept(0, 0, 4, ASYNC_SCRATCH, write=False),
    ]
    sent = [(0, 0, seq) for seq in range(len(frames))]
    async with _connected(check, connect) as (service, vmm), _serve(check, _Devices(), service):
        completions = _match(check, sent, await _exchange(check, vmm, [frames[:2], frames[2:]], len(frames)))
    statuses = [completions[key].status for key in sent]
    expected = [Status.HANDLER_FAILED] * 3 + [Status.COMPLETED] * 2
    if statuses != expected:
        _fail(check, f"statuses were {[s.name for s in statuses]}, expected {[s.name for s in expected]}")
    for seq in (1, 2):
        if completions[0, 0, seq].rax != 0xFFFF_FFFF:
            _fail(check, f"a failed read returned {completions[0, 0, seq].rax:#x}, not all ones")
    if completions[0, 0, 4].rax != 0x55:
        _fail(check, "the read after the failures did not see the write before it")


@_conformance_check
async def check_send_to_gone_peer(connect: Connect) -> None:
    """Once one end closes, the other's receive ends and its send raises TransportClosedError."""
    check = "send to a gone peer"
    for closing in ("service", "vmm"):
        async with _connected(check, connect) as (service, vmm):
            gone, survivor = (service, vmm) if closing == "service" else (vmm, service)
            other = "vmm" if closing == "service" else "service"
            await gone.aclose()
            await gone.aclose()  # closing twice is harmless
            with _within(check, f"the {other} side's receive_batch did not return after the {closing} side closed"):
                frames = await survivor.receive_batch()
            if frames:
                _fail(check, f"the {other} side received {len(frames)} frames nobody sent")
            await _expect_closed_send(check, survivor, f"on the {other} side after the {closing} side closed")
            await _expect_closed_send(check, gone, f"on the {closing} side after its own aclose()")


CHECKS: tuple[Callable[[Connect], Awaitable[None]], ...] = (
    check_per_vp_order,
    check_batching,
    check_one_completion_each,
    check_stop_with_intercepts_in_flight,
    check_stop_when_idle,
    check_peer_closes_when_idle,
    check_peer_closes_with_intercept_in_flight,
    check_malformed_frames,
    check_handler_failures,
    check_send_to_gone_peer,
)
"""Every check, in the order :func:`check_transport` runs them."""


async def check_transport(connect: Connect, *, batches: bool = True) -> None:
    """Run every check on pairs from ``connect``; raise ``AssertionError`` at the first failure.

    ``batches=False`` accepts one frame per ``receive_batch`` (see :func:`check_batching`).
    """
    for check in CHECKS:
        if check is check_batching:
            await check_batching(connect, batches=batches)
        else:
            await check(connect)
