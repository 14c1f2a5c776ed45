"""``intercept-dispatch poke`` as a user runs it: every error one line naming what was wrong, the exit
statuses its --help lists, values checked against the access width."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_process import ServiceProcess

from transports.service.poke import COMPLETED, ERROR_REPLY, EXIT_STATUSES, FILE_ERROR, UNREACHABLE, USAGE

HERE = Path(__file__).parent
PROG = "intercept-dispatch poke"


def poke(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "examples", "poke", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line on stderr (asserting there is exactly one, and no traceback)."""
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.rstrip("\n")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A service of tests/cli/cli_devices.py: a latch at 0x510-0x511, 0x520 broken, 0x530 read-only, a gate at 0x540."""
    tmp = tmp_path_factory.mktemp("poke")
    process = ServiceProcess(tmp, "--device", "cli_devices:router", "--deadline", "0", socket=tmp / "s.sock", cwd=HERE)
    assert process.socket is not None
    yield process.socket
    assert process.stop() == 0, process.log


def at(service: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return poke("--socket", str(service), *args)


def test_a_read_and_a_write_complete(service: Path) -> None:
    assert at(service, "outw", "0x510", "0x1234").returncode == COMPLETED
    read = at(service, "inw", "0x510")
    assert (read.returncode, read.stdout, read.stderr) == (COMPLETED, "0x1234\n", "")


@pytest.mark.parametrize(
    ("access", "value", "line"),
    [
        ("outb", "0x100", "0x100 does not fit outb: it writes one byte, 0..0xff"),
        ("outb", "-5", "-5 does not fit outb: it writes one byte, 0..0xff"),
        ("outw", "0x10000", "0x10000 does not fit outw: it writes 16 bits, 0..0xffff"),
        ("outl", "0x100000000", "0x100000000 does not fit outl: it writes 32 bits, 0..0xffffffff"),
        ("outb", "zz", "'zz' is not a number (write e.g. 0x3F8, 1016, 0o1770 or 0b1)"),
    ],
)
def test_a_value_that_does_not_fit_the_access_is_refused_and_nothing_is_written(
    service: Path, access: str, value: str, line: str
) -> None:
    assert at(service, "outw", "0x510", "0x5a5a").returncode == COMPLETED
    refused = at(service, access, "0x510", value)
    assert refused.returncode == USAGE
    assert one_line(refused) == f"{PROG}: error: argument VALUE: {line}"
    assert at(service, "inw", "0x510").stdout == "0x5a5a\n"  # what was there before


@pytest.mark.parametrize(("access", "value"), [("outb", "0xff"), ("outw", "0xffff"), ("outb", "0")])
def test_values_at_the_ends_of_the_range_are_written(service: Path, access: str, value: str) -> None:
    assert at(service, access, "0x510", value).returncode == COMPLETED
    read = at(service, access.replace("out", "in"), "0x510")
    assert (read.returncode, int(read.stdout, 0)) == (COMPLETED, int(value, 0))


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ("--vp", "99999999999", "inb", "0x510"),
            "argument --vp: 99999999999 is outside 0..0xffffffff (a VP index is 32 bits)",
        ),
        (("--vp", "-1", "inb", "0x510"), "argument --vp: -1 is outside 0..0xffffffff (a VP index is 32 bits)"),
        (
            ("--vm", str(1 << 64), "inb", "0x510"),
            f"argument --vm/--partition: {1 << 64} is outside 0..0xffffffffffffffff (a VM id is 64 bits)",
        ),
        (
            ("--server-uid", "-1", "inb", "0x510"),
            "argument --server-uid: -1 is outside 0..0xffffffff (a user id is 32 bits)",
        ),
        (("inb", "0x10000"), "argument PORT: 0x10000 is outside 0..0xffff (a port number is 16 bits)"),
        (("--vp", "x", "inb", "0x510"), "argument --vp: 'x' is not a number (write e.g. 0x3F8, 1016, 0o1770 or 0b1)"),
        (("--timeout", "0", "inb", "0x510"), "argument --timeout: 0 is out of range (more than 0 seconds)"),
        (("inb",), "inb needs a PORT, e.g. inb 0x3F8"),
        (("outb", "0x510"), "outb needs a VALUE to write: outb 0x510 VALUE"),
        (("inb", "0x510", "5"), "inb takes no VALUE (it reads; got '5')"),
        (("ports", "3"), "ports takes no PORT (got 0x3)"),
        (("--socket=", "inb", "0x510"), "argument --socket: the path is empty"),
        (("save",), "save needs a FILE, e.g. save vm0.json"),
        (("--vm", "3", "restore"), "restore needs a FILE, e.g. restore vm3.json"),
        (("save", "a.json", "b.json"), "save takes one FILE (got also 'b.json')"),
        (("reset", "0x70"), "reset takes no argument (got '0x70')"),
        (("release", "now"), "release takes no argument (got 'now')"),
    ],
)
def test_usage_errors_are_one_line_naming_the_value(args: tuple[str, ...], line: str) -> None:
    # Checked before any connection: no service is needed.
    result = poke(*args)
    assert result.returncode == USAGE
    assert one_line(result) == f"{PROG}: error: {line}"
    assert "_number" not in result.stderr and "usage:" not in result.stderr


def test_an_unknown_access_lists_the_known_ones() -> None:
    result = poke("inq", "0x510")
    assert result.returncode == USAGE
    line = one_line(result)
    # (How argparse quotes the choices differs between Python versions.)
    assert line.startswith(f"{PROG}: error: argument ACCESS: invalid choice: 'inq' (choose from ")
    assert all(name in line for name in ("inb", "inw", "inl", "outb", "outw", "outl", "ports"))


def test_the_largest_vp_and_vm_are_sent(service: Path) -> None:
    result = at(service, "--vp", "0xffffffff", "--vm", str((1 << 64) - 1), "inb", "0x530")
    assert (result.returncode, result.stdout, result.stderr) == (COMPLETED, "0x6b\n", "")


def test_a_partly_unclaimed_access_names_the_unclaimed_ports(service: Path) -> None:
    # inl 0x50F covers 0x50f-0x512; the service claims 0x510 and 0x511 of them.
    assert at(service, "outw", "0x510", "0xbeef").returncode == COMPLETED
    result = at(service, "inl", "0x50F")
    assert (result.returncode, result.stdout) == (COMPLETED, "0xffbeefff\n")
    assert one_line(result) == (
        f"{PROG}: note: the service does not claim ports 0x50f, 0x512 for reads, "
        "part of this 4-byte access to ports 0x50f-0x512 (those bytes read as 0xff)"
    )
    one = at(service, "inw", "0x50F")
    assert one_line(one) == (
        f"{PROG}: note: the service does not claim port 0x50f for reads, "
        "part of this 2-byte access to ports 0x50f-0x510 (that byte reads as 0xff)"
    )


def test_an_access_wholly_unclaimed_says_so(service: Path) -> None:
    read = at(service, "inw", "0x600")
    assert (read.returncode, read.stdout) == (COMPLETED, "0xffff\n")
    assert one_line(read) == (
        f"{PROG}: note: the service does not claim any of ports 0x600-0x601 for reads (unclaimed ports read as 0xff)"
    )
    write = at(service, "outb", "0x530", "1")  # claimed for reads only
    assert write.returncode == COMPLETED
    assert one_line(write) == f"{PROG}: note: the service does not claim port 0x530 for writes (the write was dropped)"


def test_an_error_status_is_one_line_and_status_1(service: Path) -> None:
    result = at(service, "inb", "0x520")
    assert result.returncode == ERROR_REPLY
    assert one_line(result) == (
        f"{PROG}: error: inb 0x520: the service answered HANDLER_FAILED (detail 0x0): "
        "the device's handler raised an error (the service's log says which)"
    )
    partly_unclaimed = at(service, "inw", "0x520")  # 0x521 is unclaimed: still the one line of the error
    assert partly_unclaimed.returncode == ERROR_REPLY
    assert one_line(partly_unclaimed).startswith(f"{PROG}: error: inw 0x520: the service answered HANDLER_FAILED")


def test_a_service_that_does_not_answer_in_time(service: Path) -> None:
    try:
        result = at(service, "--timeout", "1", "inb", "0x540")  # the gate: answers once someone writes it
        assert result.returncode == UNREACHABLE
        assert one_line(result) == f"{PROG}: error: the service at {service} did not answer within 1 s"
    finally:
        assert at(service, "outb", "0x540", "0").returncode == COMPLETED  # lets the service finish that read


def test_ports_lists_the_claimed_ranges(service: Path) -> None:
    result = at(service, "ports")
    assert (result.returncode, result.stderr) == (COMPLETED, "")
    assert result.stdout.split("\n") == [
        "0x0510-0x0511 rw",
        "0x0520-0x0520 rw",
        "0x0530-0x0530 r-",
        "0x0540-0x0540 rw",
        "",
    ]


def test_no_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    result = poke("--socket", str(path), "inb", "0x80")
    assert result.returncode == UNREACHABLE
    assert one_line(result) == (
        f"{PROG}: error: no service at {path}: there is no such file "
        f"(start a service there with: intercept-dispatch serve --socket {path})"
    )


def test_no_such_directory(tmp_path: Path) -> None:
    path = tmp_path / "gone" / "s.sock"
    result = poke("--socket", str(path), "inb", "0x80")
    assert result.returncode == UNREACHABLE
    assert one_line(result) == f"{PROG}: error: no service at {path}: the directory {path.parent} does not exist"


def test_a_file_in_the_way_of_the_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "s.sock"
    result = poke("--socket", str(path), "inb", "0x80")
    assert result.returncode == UNREACHABLE
    assert one_line(result) == f"{PROG}: error: no service at {path}: {tmp_path / 'file'} is not a directory"


def test_a_directory_or_a_plain_file_is_not_a_socket(tmp_path: Path) -> None:
    directory = poke("--socket", str(tmp_path), "inb", "0x80")
    assert directory.returncode == UNREACHABLE
    assert one_line(directory) == f"{PROG}: error: no service at {tmp_path}: it is a directory, not a socket"
    plain = tmp_path / "plain"
    plain.write_text("")
    result = poke("--socket", str(plain), "inb", "0x80")
    assert result.returncode == UNREACHABLE
    assert one_line(result) == f"{PROG}: error: no service at {plain}: it is not a socket"


def test_a_socket_with_no_service_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(path))  # bound, never listening: what a service that died leaves behind
        result = poke("--socket", str(path), "inb", "0x80")
    assert result.returncode == UNREACHABLE
    assert one_line(result) == (
        f"{PROG}: error: no service at {path}: the socket file exists but no service is listening on it "
        "(a service that has stopped?)"
    )


def test_a_listener_that_hangs_up_without_answering_the_hello(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        listener.settimeout(120)  # a poke that never connects fails the test below instead of hanging it

        def hang_up() -> None:
            with contextlib.suppress(TimeoutError):
                connection, _ = listener.accept()
                connection.close()

        thread = threading.Thread(target=hang_up)
        thread.start()
        result = poke("--socket", str(path), "inb", "0x80")
        thread.join()
    assert result.returncode == UNREACHABLE
    assert one_line(result) == f"{PROG}: error: the service at {path} closed the connection without answering the HELLO"


def test_help_lists_the_exit_statuses() -> None:
    result = poke("--help")
    assert (result.returncode, result.stderr) == (0, "")
    block = result.stdout.split("exit status:\n", 1)[1]
    listed = {int(m[1]): " ".join(m[2].split()) for m in re.finditer(r"^  (\d+) +(.+(?:\n {4,}.+)*)", block, re.M)}
    assert listed == EXIT_STATUSES


# Lifecycle verbs against the example PC's devices (the command's default set), one VM per test.


@pytest.fixture(scope="module")
def pc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("poke-pc")
    process = ServiceProcess(tmp, "--deadline", "0", socket=tmp / "s.sock")
    assert process.socket is not None
    yield process.socket
    assert process.stop() == 0, process.log


def test_a_vm_outlives_its_connections(pc: Path) -> None:
    # poke --vm ID outb 0x70 0x34; outb 0x71 0xab, then a later poke --vm ID outb 0x70 0x34; inb 0x71.
    assert at(pc, "--vm", "21", "outb", "0x70", "0x34").returncode == COMPLETED
    assert at(pc, "--vm", "21", "outb", "0x71", "0xab").returncode == COMPLETED
    assert at(pc, "--vm", "21", "outb", "0x70", "0x34").returncode == COMPLETED
    assert at(pc, "--vm", "21", "inb", "0x71").stdout == "0xab\n"
    assert at(pc, "--vm", "22", "outb", "0x70", "0x34").returncode == COMPLETED
    assert at(pc, "--vm", "22", "inb", "0x71").stdout != "0xab\n"  # another VM, other devices


def test_save_restore_reset_and_release(pc: Path, tmp_path: Path) -> None:
    saved = tmp_path / "vm23.json"
    assert at(pc, "--vm", "23", "outb", "0x3f9", "0x05").returncode == COMPLETED  # COM1's IER
    result = at(pc, "--vm", "23", "save", str(saved))
    assert (result.returncode, result.stdout, result.stderr) == (COMPLETED, "", "")
    assert '"format": "intercept-dispatch device state"' in saved.read_text()
    assert at(pc, "--vm", "23", "reset").returncode == COMPLETED
    assert at(pc, "--vm", "23", "inb", "0x3f9").stdout == "0x00\n"  # its power-on value
    assert at(pc, "--vm", "23", "restore", str(saved)).returncode == COMPLETED
    assert at(pc, "--vm", "23", "inb", "0x3f9").stdout == "0x05\n"
    assert at(pc, "--vm", "23", "pause").returncode == COMPLETED
    assert at(pc, "--vm", "23", "resume").returncode == COMPLETED
    assert at(pc, "--vm", "23", "release").returncode == COMPLETED
    assert at(pc, "--vm", "23", "inb", "0x3f9").stdout == "0x00\n"  # a new VM


def test_a_bad_state_file_is_one_line_naming_the_device_and_field_and_the_vm_is_untouched(
    pc: Path, tmp_path: Path
) -> None:
    saved = tmp_path / "vm24.json"
    assert at(pc, "--vm", "24", "outb", "0x3f9", "0x03").returncode == COMPLETED
    assert at(pc, "--vm", "24", "save", str(saved)).returncode == COMPLETED
    text = saved.read_text()
    saved.write_text(text.replace('"kind": "uart16550"', '"kind": "i8042"', 1))
    result = at(pc, "--vm", "24", "restore", str(saved))
    assert result.returncode == ERROR_REPLY
    line = one_line(result)
    assert line.startswith(f"{PROG}: error: restore {saved}: the service at {pc} refused RESTORE (STATE_ERROR): ")
    assert "uart16550@0x3f8" in line and "kind" in line
    assert at(pc, "--vm", "24", "inb", "0x3f9").stdout == "0x03\n"  # untouched


def test_a_state_file_that_cannot_be_read(pc: Path, tmp_path: Path) -> None:
    missing = tmp_path / "none.json"
    result = at(pc, "restore", str(missing))
    assert result.returncode == FILE_ERROR
    assert one_line(result) == f"{PROG}: error: restore {missing}: cannot read it: No such file or directory"
