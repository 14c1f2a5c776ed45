"""Two vCPUs hammering one device: its handlers never run at the same time, and every access counts once.

``smp_tickets`` runs on both vCPUs at once: each takes N tickets (IN) and
gives each back (OUT). The synchronous handlers run on the vCPU threads, so
only the VM's device lock keeps them apart; the dispenser notices any
overlap (a ticket handed out twice, an access seen inside another). The
thread switch interval is made short so that a missing lock would show.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import anyio
import anyio.lowlevel
import pytest
from kvm_machine import run_guest
from kvm_support import requires_kvm

from dispatcher import Dispatcher, PortAccess, Router, on_port
from examples.guests import IN_LOOP_PORT, SMP_TICKET_PORT, in_loop_image, smp_tickets_image
from examples.guests.devices import TicketDispenser
from transports.kvm import KvmTransport, StopReason, boot_flat_image, reset_to_real_mode

TICKETS = 2000  # per vCPU


class AsyncGiveBack(TicketDispenser):
    """Gives tickets back in an async handler: those intercepts go through the event loop."""

    @on_port(4, 4)
    async def give_back(self, access: PortAccess) -> None:  # type: ignore[override]
        await anyio.lowlevel.checkpoint()  # the device lock is not held across an await
        TicketDispenser.give_back(self, access)


@pytest.fixture
def switch_often() -> Iterator[None]:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


@requires_kvm
@pytest.mark.anyio
@pytest.mark.usefixtures("switch_often")
@pytest.mark.parametrize("posted", [True, False], ids=["posted", "waited"])
@pytest.mark.parametrize("device", [TicketDispenser, AsyncGiveBack], ids=["sync", "async-give-back"])
async def test_two_vcpus_take_and_give_back_every_ticket_exactly_once(
    posted: bool, device: type[TicketDispenser]
) -> None:
    dispenser = device()
    vm, _ = boot_flat_image(smp_tickets_image(TICKETS))
    with vm:
        reset_to_real_mode(vm.create_vcpu())  # the second vCPU starts where the first does
        run = await run_guest(vm, devices=[dispenser], posted_writes=posted)
    assert dispenser.errors == []
    assert dispenser.overlaps == 0
    assert dispenser.taken == {0: TICKETS, 1: TICKETS}
    assert dispenser.returned == {0: TICKETS, 1: TICKETS}
    assert dispenser.next_ticket == 2 * TICKETS + 1 and dispenser.holders == {}
    assert dispenser.status == {0: 0, 1: 0}  # each vCPU saw its tickets grow
    assert sorted(stop.vp_index for stop in run.transport.stops) == [0, 1]
    assert run.reasons == [StopReason.HALTED, StopReason.HALTED]
    per_port = run.dispatcher.stats.per_port
    assert per_port[SMP_TICKET_PORT] == per_port[SMP_TICKET_PORT + 4] == 2 * TICKETS
    transport = run.transport
    assert transport.intercepts == 4 * TICKETS + 2
    if device is TicketDispenser:
        assert transport.answered_inline == transport.intercepts  # no intercept went through the event loop
    else:
        assert transport.via_loop >= 2 * TICKETS  # every give-back came back from the event loop
    assert (transport.posted == 2 * TICKETS + 2) == posted


def test_the_dispenser_notices_a_handler_running_inside_another() -> None:
    # What two unlocked vCPU threads would do, made certain: a second take while the first is in its window.
    inner: list[int | None] = []
    dispenser = TicketDispenser()

    def window() -> None:
        if dispenser.window is window:
            dispenser.window = lambda: None  # once
            inner.append(dispenser.take(PortAccess(SMP_TICKET_PORT, 4, False, 0, 0, 1, 0)))

    dispenser.window = window
    outer = dispenser.take(PortAccess(SMP_TICKET_PORT, 4, False, 0, 0, 0, 0))
    assert outer == inner[0] == 1
    assert dispenser.overlaps == 1
    assert dispenser.errors == ["ticket 1 handed out twice (VP 1, VP 0)"]


@requires_kvm
@pytest.mark.anyio
async def test_a_hung_handler_on_a_vcpu_thread_is_answered_and_its_thread_abandoned() -> None:
    # The handler runs on the vCPU thread and does not return: the dispatcher's watchdog answers for it and
    # ends the connection; closing the transport gives up on that thread instead of waiting for it.
    release = threading.Event()
    router = Router()

    @router.claim(IN_LOOP_PORT)
    def hang(access: PortAccess) -> int:
        release.wait(60)
        return 0

    hung: list[str] = []
    vm, _ = boot_flat_image(in_loop_image(10))
    with vm:
        transport = KvmTransport(vm)
        dispatcher = Dispatcher(router, deadline=0.2, on_hung=hung.append)
        transport.lock = dispatcher.lock
        with anyio.fail_after(60):
            await dispatcher.serve(transport)
        release.set()
        [runner] = transport.runners
        assert runner.join(60)  # it returned from the handler and ended without touching the vCPU
    [stop] = transport.stops
    assert stop.reason is StopReason.ERROR and "abandoned" in stop.detail
    assert len(hung) == 1 and "VP 0" in hung[0]
    assert dispatcher.stats.deadline_exceeded == 1  # the watchdog's answer; the late result is not counted
