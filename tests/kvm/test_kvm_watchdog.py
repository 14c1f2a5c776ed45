"""Kicking a vCPU out of KVM_RUN from another thread (the watchdog path)."""

from __future__ import annotations

import threading
import time

from kvm_support import requires_kvm

from transports.kvm import InterruptedExit, boot_flat_image

pytestmark = requires_kvm

SPIN = b"\xeb\xfe"  # jmp $


def test_watchdog_interrupts_a_spinning_guest() -> None:
    vm, vcpu = boot_flat_image(SPIN)
    with vm:
        timer = threading.Timer(0.2, vcpu.kick)
        timer.start()
        started = time.monotonic()
        exit = vcpu.run()
        elapsed = time.monotonic() - started
        timer.join()
        assert isinstance(exit, InterruptedExit)
        assert vcpu.get_regs().rip == 0x7C00  # still on the jmp $
        assert elapsed >= 0.15
        assert vcpu.kvm_run.immediate_exit == 0  # cleared for the next run

        # The guest can be resumed and kicked again.
        timer = threading.Timer(0.05, vcpu.kick)
        timer.start()
        assert isinstance(vcpu.run(), InterruptedExit)
        timer.join()


def test_kick_before_run_is_not_lost() -> None:
    vm, vcpu = boot_flat_image(SPIN)
    with vm:
        vcpu.kick()  # no thread is in run() yet: immediate_exit carries it
        assert isinstance(vcpu.run(), InterruptedExit)


def test_vcpu_thread_kicked_from_main_thread() -> None:
    vm, vcpu = boot_flat_image(SPIN)
    with vm:
        results: list[object] = []
        worker = threading.Thread(target=lambda: results.append(vcpu.run()))
        worker.start()
        time.sleep(0.1)
        deadline = time.monotonic() + 10
        while worker.is_alive() and time.monotonic() < deadline:
            vcpu.kick()
            worker.join(0.1)
        assert not worker.is_alive()
        assert results and isinstance(results[0], InterruptedExit)
