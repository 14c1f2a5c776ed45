"""Bare KVM exit-rate baseline: ``out 0x80, al`` in a loop, no framework at all.

``python -m transports.kvm.bench [EXITS]`` prints the figures. The loop per
exit is one ``fcntl.ioctl(KVM_RUN)`` plus one ``exit_reason`` read; it is
the ceiling any Python dispatch path over KVM can reach on this host.
"""

from __future__ import annotations

import argparse
import fcntl
import statistics
import time
from dataclasses import dataclass

from . import _abi
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


def bare_out_loop(
    exits: int = 200_000, *, chunk: int = 100, path: str = KVM_PATH, image: bytes | None = None
) -> BareLoopResult:
    """Run the out_loop guest for ``exits`` OUTs with the thinnest possible KVM_RUN loop."""
    if exits < chunk or exits % chunk:
        raise ValueError(f"exits ({exits}) must be a positive multiple of chunk ({chunk})")
    if image is None:
        from examples.guests import out_loop_image  # deferred: examples is optional at run time

        image = out_loop_image(exits)
    vm, vcpu = boot_flat_image(image, path=path)
    with vm:
        fd = vcpu.fd
        run = vcpu.kvm_run
        ioctl = fcntl.ioctl
        kvm_run = _abi.KVM_RUN
        exit_io = _abi.KVM_EXIT_IO
        # One untimed exit first: it includes mode switching and page faulting.
        ioctl(fd, kvm_run, 0)
        if run.exit_reason != exit_io or run.io.port != 0x80:
            raise RuntimeError(f"out_loop guest did not start with OUT 0x80 (exit {run.exit_reason})")
        rates: list[float] = []
        perf = time.perf_counter
        remaining = exits - 1
        start = perf()
        first = True
        while remaining > 0:
            n = chunk - 1 if first else min(chunk, remaining)
            first = False
            t0 = perf()
            for _ in range(n):
                ioctl(fd, kvm_run, 0)
                if run.exit_reason != exit_io:
                    raise RuntimeError(f"unexpected exit reason {run.exit_reason}")
            rates.append(n / (perf() - t0))
            remaining -= n
        elapsed = perf() - start
        ioctl(fd, kvm_run, 0)
        if run.exit_reason != exit_io or run.io.port != _EXIT_PORT:
            raise RuntimeError("out_loop guest ran more OUTs than it was told to")
    return BareLoopResult(exits=exits - 1, elapsed_s=elapsed, chunk=chunk, chunk_rates=tuple(rates))


def bare_out_loop_exits_per_s(exits: int = 200_000, *, robust: bool = True, path: str = KVM_PATH) -> float:
    """Exits per second of the bare loop; ``robust`` uses the median chunk rate (see ``BareLoopResult``)."""
    result = bare_out_loop(exits, path=path)
    return result.median_exits_per_s if robust else result.exits_per_s


def main(argv: list[str] | None = None) -> None:
    """Print the bare loop's figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("exits", type=int, nargs="?", default=200_000)
    parser.add_argument("--chunk", type=int, default=100)
    args = parser.parse_args(argv)
    result = bare_out_loop(args.exits, chunk=args.chunk)
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
