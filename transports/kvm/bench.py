"""Bare KVM exit-rate baseline: ``out 0x80, al`` in a loop, no framework at all.

``python -m transports.kvm.bench examples/guests/out_loop.bin`` prints the
figures (that image runs 1,000,000 OUTs; ``examples.guests.out_loop_image(n)``
makes one that runs n). The loop per exit is one ``fcntl.ioctl(KVM_RUN)``
plus one ``exit_reason`` read; it is the ceiling any Python dispatch path
over KVM can reach on this host.
"""

from __future__ import annotations

import argparse
import fcntl
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from . import abi
from .boot import boot_flat_image
from .vm import KVM_PATH

__all__ = ["BareLoopResult", "bare_out_loop", "bare_out_loop_exits_per_s"]

_EXIT_PORT = 0x501


@dataclass(frozen=True, slots=True)
class BareLoopResult:
    """Timings of one bare run."""

    exits: int  # OUT 0x80 exits timed (the final exit-port OUT not included)
    elapsed_s: float  # wall time for all of them
    chunk: int  # exits per timed chunk
    chunk_rates: tuple[float, ...]  # exits/s of every chunk

    @property
    def exits_per_s(self) -> float:
        """Overall rate, including any time the host stole from this process."""
        return self.exits / self.elapsed_s

    @property
    def median_exits_per_s(self) -> float:
        """Median chunk rate: insensitive to occasional long host stalls."""
        return statistics.median(self.chunk_rates)


def bare_out_loop(image: bytes, *, chunk: int = 100, path: str = KVM_PATH) -> BareLoopResult:
    """Run an ``out_loop`` guest to its end with the thinnest possible ``KVM_RUN`` loop.

    ``image`` executes ``out 0x80, al`` N times, then writes the exit port
    0x501 and halts (``examples/guests/out_loop``). Every full chunk of
    ``chunk`` exits is timed; the first exit and the last, partial chunk are not.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, not {chunk}")
    vm, vcpu = boot_flat_image(image, path=path)
    with vm:
        fd = vcpu.fd
        run = vcpu.kvm_run
        ioctl = fcntl.ioctl
        kvm_run = abi.KVM_RUN
        exit_io = abi.KVM_EXIT_IO
        # One untimed exit first: it includes mode switching and page faulting.
        ioctl(fd, kvm_run)
        if run.exit_reason != exit_io or run.io.port != 0x80:
            raise RuntimeError(f"the guest did not start with OUT 0x80 (exit {run.exit_reason})")
        rates: list[float] = []
        perf = time.perf_counter
        exits = 0  # the OUTs after the untimed one
        start = perf()
        while True:
            t0 = perf()
            # ``done`` says, once the loop breaks, how many exits of this chunk were port I/O.
            for done in range(chunk):  # noqa: B007
                ioctl(fd, kvm_run)  # no argument: an int one costs fcntl two failed buffer lookups
                if run.exit_reason != exit_io:
                    break
            else:
                rates.append(chunk / (perf() - t0))
                exits += chunk
                continue
            break
        elapsed = perf() - start
        # The loop ended at the first exit that was not port I/O: the HLT after the exit port's OUT (whose port
        # KVM leaves in kvm_run.io: a HLT exit writes nothing there).
        if run.exit_reason != abi.KVM_EXIT_HLT or run.io.port != _EXIT_PORT:
            raise RuntimeError(f"the guest stopped with exit {run.exit_reason}, not with its exit port and HLT")
        exits += done - 1  # this chunk's OUTs to 0x80, without the exit port's
    if not rates:
        raise ValueError(f"the guest ran {exits} OUTs, fewer than one timed chunk of {chunk}")
    return BareLoopResult(exits=exits, elapsed_s=elapsed, chunk=chunk, chunk_rates=tuple(rates))


def bare_out_loop_exits_per_s(image: bytes, *, robust: bool = True, path: str = KVM_PATH) -> float:
    """Exits per second of the bare loop; ``robust`` uses the median chunk rate (see ``BareLoopResult``)."""
    result = bare_out_loop(image, path=path)
    return result.median_exits_per_s if robust else result.exits_per_s


def main(argv: list[str] | None = None) -> None:
    """Print the bare loop's figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("image", type=Path, help="an out_loop guest (examples/guests/out_loop.bin)")
    parser.add_argument("--chunk", type=int, default=100)
    args = parser.parse_args(argv)
    result = bare_out_loop(args.image.read_bytes(), chunk=args.chunk)
    rates = sorted(result.chunk_rates)
    print(f"exits:                 {result.exits}")
    print(f"wall time:             {result.elapsed_s:.3f} s")
    print(f"overall exits/s:       {result.exits_per_s:,.0f}")
    print(
        f"median chunk exits/s:  {result.median_exits_per_s:,.0f}  (per exit {1e6 / result.median_exits_per_s:.2f} us)"
    )
    print(f"best/worst chunk:      {rates[-1]:,.0f} / {rates[0]:,.0f}")


if __name__ == "__main__":
    main()
