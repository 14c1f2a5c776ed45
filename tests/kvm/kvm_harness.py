"""A deliberately small port-I/O loop for the KVM tests (no dispatcher).

Device models mirror what the guests in examples/guests expect: a 16550
subset (THR/RBR, MCR loopback, LSR), the 4-byte echo latch at 0xE0-0xE3,
isa-debug-exit at 0x501; every other port reads all ones.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from transports.kvm import HltExit, InterruptedExit, IoExit, MmioExit, Vcpu, VcpuExit

COM1 = 0x3F8
ECHO = 0xE0
EXIT = 0x501


class GuestTimeoutError(AssertionError):
    """The guest neither exited nor halted within the allowed exits/time."""


@dataclass
class Uart16550:
    """THR/RBR, MCR bit 4 loopback and LSR bits DR/THRE; nothing else."""

    base: int = COM1
    output: bytearray = field(default_factory=bytearray)
    loopback: bool = False
    rx: deque[int] = field(default_factory=deque)

    def claims(self, port: int) -> bool:
        return self.base <= port < self.base + 8

    def read(self, port: int) -> int:
        reg = port - self.base
        if reg == 0:
            return self.rx.popleft() if self.rx else 0
        if reg == 5:
            return 0x60 | (0x01 if self.rx else 0)  # THRE + TEMT always, DR if data
        return 0

    def write(self, port: int, value: int) -> None:
        reg = port - self.base
        if reg == 0:
            if self.loopback:
                self.rx.append(value)
            else:
                self.output.append(value)
        elif reg == 4:
            self.loopback = bool(value & 0x10)


@dataclass
class EchoLatch:
    """32-bit register at base..base+3; an N-byte access at port P uses bytes P-base..P-base+N-1."""

    base: int = ECHO
    value: int = 0
    log: list[tuple[str, int, int, int]] = field(default_factory=list)

    def claims(self, port: int) -> bool:
        return self.base <= port < self.base + 4

    def read(self, port: int, size: int) -> int:
        shift = (port - self.base) * 8
        result = (self.value >> shift) & ((1 << (size * 8)) - 1)
        self.log.append(("in", port, size, result))
        return result

    def write(self, port: int, size: int, data: int) -> None:
        shift = (port - self.base) * 8
        mask = ((1 << (size * 8)) - 1) << shift
        self.value = (self.value & ~mask & 0xFFFFFFFF) | ((data << shift) & mask)
        self.log.append(("out", port, size, data))


@dataclass
class Machine:
    """The devices plus the exit status the guest reported."""

    uart: Uart16550 = field(default_factory=Uart16550)
    echo: EchoLatch = field(default_factory=EchoLatch)
    status: int | None = None
    exits: int = 0
    io_exits: list[IoExit] = field(default_factory=list)
    mmio_exits: list[MmioExit] = field(default_factory=list)
    record: bool = False

    def port_read(self, port: int, size: int) -> int:
        if self.uart.claims(port) and size == 1:
            return self.uart.read(port)
        if self.echo.claims(port):
            return self.echo.read(port, size)
        return (1 << (size * 8)) - 1

    def port_write(self, port: int, size: int, data: int) -> None:
        if self.uart.claims(port) and size == 1:
            self.uart.write(port, data)
        elif self.echo.claims(port):
            self.echo.write(port, size, data)
        elif port == EXIT and size == 1:
            self.status = data

    def handle(self, vcpu: Vcpu, exit: IoExit) -> None:
        size = exit.size
        if exit.is_in:
            data = b"".join(self.port_read(exit.port, size).to_bytes(size, "little") for _ in range(exit.count))
            vcpu.write_io_data(exit, data)
        else:
            raw = vcpu.read_io_data(exit)
            for i in range(exit.count):
                self.port_write(exit.port, size, int.from_bytes(raw[i * size : (i + 1) * size], "little"))

    def run(self, vcpu: Vcpu, *, max_exits: int = 1_000_000, timeout: float = 30.0) -> VcpuExit:
        """Run until the guest writes the exit port, halts, or something unexpected happens."""
        deadline = time.monotonic() + timeout
        while self.exits < max_exits:
            if time.monotonic() > deadline:
                break
            exit = vcpu.run()
            self.exits += 1
            if isinstance(exit, IoExit):
                if self.record:
                    self.io_exits.append(exit)
                self.handle(vcpu, exit)
                if self.status is not None:
                    return exit
                continue
            if isinstance(exit, InterruptedExit):
                continue
            if isinstance(exit, MmioExit):
                # Nothing is mapped there but ROM: drop writes, reads see all ones.
                self.mmio_exits.append(exit)
                continue
            if isinstance(exit, HltExit):
                return exit
            return exit  # anything else ends the run; the caller asserts on it
        raise GuestTimeoutError(f"guest still running after {self.exits} exits")
