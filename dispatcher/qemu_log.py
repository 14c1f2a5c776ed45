"""QEMU's port I/O as trace events: read a ``-trace memory_region_ops_*`` log, replay it against a device model.

Record a machine under QEMU with TCG (with KVM the PIC and PIT are in the
kernel and never show in the log)::

    qemu-system-x86_64 -accel tcg -machine pc ... -msg timestamp=on -D qemu.log \\
        -trace memory_region_ops_read -trace memory_region_ops_write -trace pic_interrupt

:func:`read_qemu_log` turns the log (plain or gzip-compressed) into the
events of :mod:`dispatcher.trace_records`, which :mod:`dispatcher.replay`
compares against the example devices, as it does a trace the project
recorded:

- each port access becomes an :class:`~dispatcher.trace_records.Intercept`
  (``IN``/``OUT`` with DX, from 32-bit flat protected mode, VP = QEMU's CPU
  index) and the :class:`~dispatcher.trace_records.Completion` the engine
  would send for it, RAX holding the value QEMU's device returned for a
  read, so a device that answers as QEMU's did matches byte for byte;
- each ``pic_interrupt`` line (the 8259's interrupt acknowledge cycle)
  becomes a :class:`~dispatcher.trace_records.ClockAdvance` to its time, so
  the timers due by then have run, and an
  :class:`~dispatcher.trace_records.Acknowledge` with QEMU's vector.

Time: with ``-msg timestamp=on`` every line starts ``TID@SECONDS.MICROSECONDS:``
(the host's wall clock, which TCG's virtual clock follows); an event's time
is its line's, in nanoseconds from the first timestamped line, never going
backwards (threads write their lines slightly out of order). A line without
the prefix takes the time of the line before it.

Which lines count (the rest is an error naming the line):

- ``memory_region_ops_read``/``_write`` with CPU index 0 or more and an
  address below 0x10000 are port I/O. QEMU prints the address in the
  region's address space without naming it; on a PC the memory below 64 KiB
  is RAM, which never shows in this trace, so the address tells them apart.
  Those from CPU -1 (the machine itself or a device's DMA, not a guest
  instruction) and memory-mapped ones are skipped;
- ``pic_interrupt irq N intno V``: an interrupt acknowledge;
- skipped: lines of other trace events (``NAME args``, NAME a trace event's
  identifier), blank lines and ``#`` comment lines.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import replace
from functools import lru_cache
from typing import NamedTuple

from .errors import DispatchError
from .fields import AccessInfo, AccessType, ExecutionState, SegmentAttributes, SegmentRegister
from .message import IoPortInterceptMessage
from .trace_records import Acknowledge, ClockAdvance, Completion, Intercept, TraceEvent
from .wire import Registers, Status, pack_completion
from .x86 import encode_io_instruction, next_ip

__all__ = [
    "QEMU_PARTITION",
    "QemuAccess",
    "QemuInterrupt",
    "QemuLogError",
    "parse_qemu_log",
    "qemu_events",
    "read_qemu_log",
    "read_qemu_records",
]

QEMU_PARTITION = 1
"""The partition the intercepts of a QEMU log name (FakePartition's default)."""

_PORT_SPACE = 0x10000
_MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}
# A flat 32-bit code segment, as SeaBIOS runs most of its code in: the log has no registers.
_STATE = ExecutionState.build(cr0_pe=True)
_CS = SegmentRegister(0, 0xFFFF_FFFF, 0x08, SegmentAttributes(0xC09B))
_RIP = 0x000F_0000
_LINE = re.compile(r"(?:\d+@(\d+)\.(\d{6}):)?([A-Za-z_][A-Za-z0-9_]*)(?: (.*))?")
_OPS = re.compile(r"cpu (-?\d+) mr (?:0x)?[0-9a-f]+ addr 0x([0-9a-f]+) value 0x([0-9a-f]+) size (\d+) name '(.*)'")
_PIC = re.compile(r"irq (\d+) intno (\d+)")
_OPS_EVENTS = {"memory_region_ops_read": False, "memory_region_ops_write": True}


class QemuLogError(DispatchError):
    """A line of a QEMU log that cannot be read (``line`` its number), or a file that is not one (``line`` None)."""

    def __init__(self, reason: str, *, path: str, line: int | None = None, text: str = "") -> None:
        shown = f": {text[:120]!r}" if text else ""
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {reason}{shown}")
        self.reason = reason
        self.path = path
        self.line = line
        self.text = text


class QemuAccess(NamedTuple):
    """One port access QEMU's log shows: ``value`` is what was written or what the device returned."""

    line: int
    time_ns: int
    cpu: int
    port: int
    size: int
    is_write: bool
    value: int
    region: str


class QemuInterrupt(NamedTuple):
    """An interrupt acknowledge cycle of QEMU's 8259 pair: ``irq`` (0-15) gave ``vector``."""

    line: int
    time_ns: int
    irq: int
    vector: int


def parse_qemu_log(lines: Iterable[str], *, path: str = "<log>") -> Iterator[QemuAccess | QemuInterrupt]:
    """The port accesses and interrupt acknowledges of a log's lines, in order.

    :raises QemuLogError: naming the line number and its text.
    """
    start: int | None = None
    now = 0
    for number, raw in enumerate(lines, 1):
        text = raw.rstrip("\r\n")
        if not text.strip() or text.startswith("#"):
            continue
        match = _LINE.fullmatch(text)
        if match is None:
            raise QemuLogError("not a trace event line", path=path, line=number, text=text)
        seconds, micros, event, args = match.groups()
        if seconds is not None:
            stamp = int(seconds) * 1_000_000_000 + int(micros) * 1000
            if start is None:
                start = stamp
            now = max(now, stamp - start)
        if event in _OPS_EVENTS:
            ops = _OPS.fullmatch(args or "")
            if ops is None:
                raise QemuLogError(f"malformed {event} line", path=path, line=number, text=text)
            cpu, address, value, size, region = ops.groups()
            port, width = int(address, 16), int(size)
            if int(cpu) < 0 or port + width > _PORT_SPACE:
                continue
            if width not in _MASKS:
                raise QemuLogError(f"port access of size {width}, not 1, 2 or 4", path=path, line=number, text=text)
            yield QemuAccess(
                number, now, int(cpu), port, width, _OPS_EVENTS[event], int(value, 16) & _MASKS[width], region
            )
        elif event == "pic_interrupt":
            pic = _PIC.fullmatch(args or "")
            if pic is None:
                raise QemuLogError("malformed pic_interrupt line", path=path, line=number, text=text)
            yield QemuInterrupt(number, now, int(pic[1]), int(pic[2]))


def _lines(path: str) -> Iterator[str]:
    with open(path, "rb") as probe:
        compressed = probe.read(2) == b"\x1f\x8b"
    number = 0
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as stream:
            for number, raw in enumerate(stream, 1):
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise QemuLogError("not UTF-8 text", path=path, line=number) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise QemuLogError(f"gzip stream broken after this line ({error})", path=path, line=number) from None


def read_qemu_records(path: str | os.PathLike[str]) -> list[QemuAccess | QemuInterrupt]:
    """The port accesses and interrupt acknowledges of a log file, plain or gzip-compressed.

    :raises QemuLogError: naming the file, the line number and its text.
    """
    name = os.fspath(path)
    records = list(parse_qemu_log(_lines(name), path=name))
    if not records:
        # Only lines of other trace events (or none): replaying nothing would pass, and say nothing.
        raise QemuLogError(
            "no port access or interrupt acknowledge in the log: record it with -trace memory_region_ops_read "
            "-trace memory_region_ops_write",
            path=name,
        )
    return records


@lru_cache(maxsize=256)
def _template(size: int, is_write: bool) -> tuple[IoPortInterceptMessage, int]:
    instruction = encode_io_instruction(write=is_write, size=size, bits=32)
    message = IoPortInterceptMessage(
        access_type=AccessType.WRITE if is_write else AccessType.READ,
        access_info=AccessInfo.build(size),
        instruction_length=len(instruction),
        instruction_bytes=instruction,
        execution_state=_STATE,
        cs_segment=_CS,
        rip=_RIP,
    )
    return message, next_ip(_RIP, len(instruction), _STATE, _CS.attributes)


@lru_cache(maxsize=65536)
def _exchange(partition: int, cpu: int, port: int, size: int, is_write: bool, value: int) -> tuple[bytes, bytes]:
    """The intercept frame of one access and the completion the engine sends when it moves ``value``."""
    template, next_rip = _template(size, is_write)
    # An IN starts with RAX = 0, so the completion's RAX is exactly the value read.
    message = replace(
        template, port_number=port, rax=value if is_write else 0, vp_index=cpu, source_partition=partition
    )
    registers = Registers.RIP if is_write else Registers.RIP | Registers.RAX
    completion = pack_completion(
        partition, cpu, Status.COMPLETED, registers, next_rip, value, 0, 0, 0, port, template.access_info
    )
    return message.to_bytes(), completion


def qemu_events(records: Iterable[QemuAccess | QemuInterrupt], *, partition: int = QEMU_PARTITION) -> list[TraceEvent]:
    """The trace events of QEMU's accesses and acknowledges (see the module's description)."""
    events: list[TraceEvent] = []
    for record in records:
        now = record.time_ns
        if isinstance(record, QemuAccess):
            intercept, completion = _exchange(
                partition, record.cpu, record.port, record.size, record.is_write, record.value
            )
            events += (Intercept(now, now, intercept), Completion(now, now, completion))
        else:
            events += (ClockAdvance(now, now), Acknowledge(now, now, record.vector))
    return events


def read_qemu_log(path: str | os.PathLike[str], *, partition: int = QEMU_PARTITION) -> list[TraceEvent]:
    """The trace events of a QEMU log file (plain or gzip-compressed), ready for :func:`dispatcher.replay.replay`.

    :raises QemuLogError: naming the file, the line number and its text.
    """
    return qemu_events(read_qemu_records(path), partition=partition)
