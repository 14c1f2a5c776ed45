"""Reading QEMU's ``-trace memory_region_ops_*`` log: which lines count, the frames made, and errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from dispatcher import PortAccess, Router, decode_message
from dispatcher.qemu_log import (
    QEMU_PARTITION,
    QemuAccess,
    QemuInterrupt,
    QemuLogError,
    parse_qemu_log,
    qemu_events,
    read_qemu_log,
)
from dispatcher.replay import replay
from dispatcher.trace_records import Acknowledge, ClockAdvance, Completion, Intercept
from dispatcher.wire import Registers, decode_completion

READ = "7@1700000000.000100:memory_region_ops_read cpu 0 mr 0x5561 addr 0x3fd value 0x60 size 1 name 'serial'\n"
WRITE = "7@1700000000.000350:memory_region_ops_write cpu 1 mr 0x5562 addr 0x70 value 0x8f size 1 name 'rtc-index'\n"
UNASSIGNED = (
    "7@1700000000.000400:memory_region_ops_read cpu 0 mr 0x5563 addr 0x2f9 value 0xffffffffffffffff size 1 name 'io'\n"
)
PIC = "7@1700000000.001000:pic_interrupt irq 0 intno 8\n"


def test_port_accesses_keep_port_size_value_cpu_and_time_from_the_first_line() -> None:
    records = list(parse_qemu_log([READ, WRITE, UNASSIGNED]))
    assert records == [
        QemuAccess(1, 0, 0, 0x3FD, 1, False, 0x60, "serial"),
        QemuAccess(2, 250_000, 1, 0x70, 1, True, 0x8F, "rtc-index"),
        QemuAccess(3, 300_000, 0, 0x2F9, 1, False, 0xFF, "io"),  # QEMU prints all 64 bits of an unassigned read
    ]


def test_other_lines_are_skipped() -> None:
    lines = [
        "# recorded by hand\n",
        "\n",
        "7@1700000000.000000:memory_region_ops_write cpu -1 mr 0x1 addr 0xfee00000 value 0x0 size 4 name 'apic-msi'\n",
        "7@1700000000.000001:memory_region_ops_read cpu 0 mr 0x1 addr 0xfed00000 value 0x0 size 8 name 'hpet'\n",
        "7@1700000000.000002:memory_region_ops_write cpu -1 mr 0x1 addr 0x70 value 0x0 size 1 name 'rtc-index'\n",
        "7@1700000000.000003:pic_ioport_read master 1 addr 0 val 0x0\n",
        READ,
    ]
    assert [record.line for record in parse_qemu_log(lines)] == [7]


def test_time_never_goes_backwards_and_lines_without_a_stamp_take_the_last_one() -> None:
    late = READ.replace("000100", "000900")
    unstamped = WRITE.split(":", 1)[1]
    records = list(parse_qemu_log([late, READ, unstamped]))
    assert [record.time_ns for record in records] == [0, 0, 0]
    records = list(parse_qemu_log([READ, late, unstamped]))
    assert [record.time_ns for record in records] == [0, 800_000, 800_000]


def test_an_interrupt_acknowledge_becomes_a_clock_advance_and_the_vector() -> None:
    records = list(parse_qemu_log([READ, PIC]))
    assert records[1] == QemuInterrupt(2, 900_000, 0, 8)
    assert qemu_events(records)[2:] == [ClockAdvance(900_000, 900_000), Acknowledge(900_000, 900_000, 8)]


def test_each_access_is_an_in_or_out_frame_and_the_completion_the_engine_makes() -> None:
    events = qemu_events(parse_qemu_log([READ, WRITE]))
    assert [type(event) for event in events] == [Intercept, Completion, Intercept, Completion]
    frames = [event.frame for event in events if isinstance(event, Intercept | Completion)]
    read = decode_message(frames[0])
    assert (read.port_number, read.access_info.access_size, read.is_write, read.vp_index) == (0x3FD, 1, False, 0)
    assert read.source_partition == QEMU_PARTITION
    completion = decode_completion(frames[1])
    assert completion.registers == Registers.RIP | Registers.RAX and completion.rax == 0x60
    assert completion.rip == read.rip + read.instruction_length
    write = decode_message(frames[2])
    assert (write.port_number, write.is_write, write.rax, write.vp_index) == (0x70, True, 0x8F, 1)
    assert decode_completion(frames[3]).registers == Registers.RIP


def _router(value: int) -> Router:
    router = Router()

    @router.claim(0x3FD)
    def lsr(access: PortAccess) -> int:
        return value

    @router.claim(0x70)
    def index(access: PortAccess) -> None:
        return None

    return router


def test_a_device_answering_as_qemu_did_replays_byte_for_byte() -> None:
    events = qemu_events(parse_qemu_log([READ, WRITE]))
    assert replay(events, _router(0x60)).ok
    result = replay(events, _router(0x20))
    assert [(d.port, d.fields) for d in result.differences] == [(0x3FD, ("rax",))]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("qemu-system-x86_64: terminating on signal 15\n", "not a trace event line"),
        (READ.replace("value 0x60", "value zz"), "malformed memory_region_ops_read line"),
        (READ[:60] + "\n", "malformed memory_region_ops_read line"),
        ("7@1700000000.000100:pic_interrupt irq x\n", "malformed pic_interrupt line"),
        (READ.replace("size 1", "size 8"), "port access of size 8"),
    ],
)
def test_a_line_that_cannot_be_read_is_an_error_naming_it(line: str, reason: str) -> None:
    with pytest.raises(QemuLogError, match=reason) as caught:
        list(parse_qemu_log([READ, line], path="qemu.log"))
    assert caught.value.line == 2 and str(caught.value).startswith("qemu.log:2: ")
    assert caught.value.text == line.rstrip("\n")


def test_gzip_and_plain_logs_read_the_same(tmp_path: Path) -> None:
    text = READ + WRITE + PIC
    (tmp_path / "plain.log").write_text(text)
    (tmp_path / "log.gz").write_bytes(gzip.compress(text.encode()))
    assert read_qemu_log(tmp_path / "plain.log") == read_qemu_log(tmp_path / "log.gz")
    assert len(read_qemu_log(tmp_path / "log.gz")) == 6


def test_a_truncated_gzip_log_is_an_error_naming_the_file(tmp_path: Path) -> None:
    data = gzip.compress((READ * 2000).encode())
    path = tmp_path / "cut.log.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(QemuLogError, match="gzip stream broken") as caught:
        read_qemu_log(path)
    assert caught.value.path == str(path)


def test_bytes_that_are_not_text_are_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "binary.log"
    path.write_bytes(READ.encode() + b"\xff\xfe\n")
    with pytest.raises(QemuLogError, match=r"binary.log:2: not UTF-8 text"):
        read_qemu_log(path)


@pytest.mark.parametrize("text", ["", "garbage line here\n", "# only a comment\nother_event x 1\n"])
def test_a_log_without_any_access_is_an_error_not_an_empty_replay(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.log"
    path.write_text(text)
    with pytest.raises(QemuLogError, match=r"empty.log: no port access or interrupt acknowledge") as caught:
        read_qemu_log(path)
    assert caught.value.line is None
