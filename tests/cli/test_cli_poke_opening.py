"""``intercept-dispatch poke`` and the opening exchange: the HELLO it sends, and every way a service can
refuse it or fail to answer, each one line naming the socket and why."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher import Completion, Registers, decode_message, encode_announcement
from dispatcher.announce import PortRange
from dispatcher.fields import Access
from dispatcher.hello import Hello, HelloReply, HelloStatus, decode_hello, encode_hello_reply
from dispatcher.wire import HELLO_REPLY, SESSION_MAJOR, SESSION_MINOR
from transports import socket_path
from transports.service import poke as poke_command
from transports.service.poke import COMPLETED, REFUSED, UNREACHABLE, USAGE
from transports.socket_path import PeerCredentials

PROG = "intercept-dispatch poke"


def poke(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "examples", "poke", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line on stderr (asserting there is exactly one, and no traceback)."""
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.rstrip("\n")


def receive(connection: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count and (chunk := connection.recv(count - len(data))):
        data += chunk
    return data


@contextlib.contextmanager
def fake_service(path: Path, answer: bytes | None) -> Iterator[list[bytes]]:
    """A listener at ``path`` serving one connection: it reads the HELLO and sends ``answer``, then closes.

    With ``answer`` None it accepts, announces port 0x80 and completes one read of it with 0x5A. Yields
    the frames it received (the HELLO, and the intercept if any), complete once the block ends.
    """
    received: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        listener.settimeout(120)  # a poke that never connects fails the test instead of hanging it

        def serve() -> None:
            with contextlib.suppress(OSError):
                connection, _ = listener.accept()
                with connection:
                    connection.settimeout(120)
                    hello = receive(connection, 24)
                    received.append(hello)
                    if answer is not None:
                        connection.sendall(answer)
                        return
                    vm = decode_hello(hello).vm
                    accepted = encode_hello_reply(HelloReply(vm))
                    connection.sendall(accepted + encode_announcement([PortRange(0x80, 0x80, Access.READ)])[0])
                    intercept = receive(connection, 144)
                    received.append(intercept)
                    message = decode_message(intercept)
                    completion = Completion(
                        message.vp_index, source_partition=message.source_partition, rax=0x5A, registers=Registers.RAX
                    )
                    connection.sendall(completion.to_bytes())

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            yield received
        finally:
            thread.join()


def test_poke_opens_with_a_hello_for_its_vm_and_sends_frames_of_that_partition(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with fake_service(path, None) as received:
        result = poke("--socket", str(path), "--vm", "0x42", "--vp", "3", "inb", "0x80")
    assert (result.returncode, result.stdout, result.stderr) == (COMPLETED, "0x5a\n", "")
    hello, intercept = received
    assert decode_hello(hello) == Hello(vm=0x42, capabilities=decode_hello(hello).capabilities)
    assert decode_hello(hello).major == SESSION_MAJOR
    message = decode_message(intercept)
    assert (message.source_partition, message.vp_index) == (0x42, 3)


@pytest.mark.parametrize(
    ("reply", "status", "line"),
    [
        (
            HelloReply(vm=0, status=HelloStatus.REFUSED, reason="VM 0 has 16 connections already"),
            REFUSED,
            "the service at {path} refused VM 0: VM 0 has 16 connections already",
        ),
        (
            HelloReply(vm=0, status=HelloStatus.NO_WORKER, reason="the worker exited with status 1"),
            REFUSED,
            "the service at {path} could not start a worker for VM 0: the worker exited with status 1",
        ),
        (
            HelloReply(vm=0, major=SESSION_MAJOR + 1, status=HelloStatus.INCOMPATIBLE_VERSION, reason="no"),
            REFUSED,
            f"the service at {{path}} speaks session version {SESSION_MAJOR + 1}.0, "
            f"this client {SESSION_MAJOR}.{SESSION_MINOR} (the major versions must match)",
        ),
    ],
)
def test_a_refusal_is_one_line_with_the_services_reason(
    tmp_path: Path, reply: HelloReply, status: int, line: str
) -> None:
    path = tmp_path / "s.sock"
    with fake_service(path, encode_hello_reply(reply)):
        result = poke("--socket", str(path), "inb", "0x80")
    assert result.returncode == status
    assert one_line(result) == f"{PROG}: error: " + line.format(path=path)


@pytest.mark.parametrize(
    ("answer", "line"),
    [
        (
            struct.pack("<IBBHQHHIBxH", HELLO_REPLY, 12, 0, 0, 0, 1, 0, 0, 7, 0),
            "the service at {path} sent a HELLO_REPLY that cannot be read: status at offset 24 = 0x7: "
            "not a HELLO_REPLY status this version defines (0-3)",
        ),
        (
            struct.pack("<IBBHQHHIBxH", HELLO_REPLY, 12, 0, 0, 0, 1, 0, 0, 2, 9),
            "the service at {path} sent a HELLO_REPLY that cannot be read: reason_length at offset 26 = 0x9: "
            "a reason of 9 bytes needs a PayloadSize of 21, the frame has 12",
        ),
        (
            encode_announcement([PortRange(0x80, 0x80, Access.READ)])[0],
            "the service at {path} sent a frame of type 0x1d000002 where its HELLO_REPLY was due "
            f"(does it speak session version {SESSION_MAJOR}.{SESSION_MINOR}?)",
        ),
        (
            encode_hello_reply(HelloReply(vm=0)) + b"\x02\x00\x00\x1d\x02" + bytes(11) + b"\x01\x01",
            "the service at {path} sent an announcement that cannot be read: payload_size at offset 4 = 0x2: "
            "an announcement needs 8 payload bytes",
        ),
    ],
)
def test_a_frame_that_cannot_be_read_is_one_line_naming_field_and_offset(
    tmp_path: Path, answer: bytes, line: str
) -> None:
    path = tmp_path / "s.sock"
    with fake_service(path, answer):
        result = poke("--socket", str(path), "inb", "0x80")
    assert result.returncode == UNREACHABLE
    assert one_line(result) == f"{PROG}: error: " + line.format(path=path)


def test_a_socket_served_by_an_untrusted_user_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The kernel reports our own uid for a listener we made (and root is always trusted), so the
    # check is told it is another user's: what an impostor's socket looks like.
    monkeypatch.setattr(socket_path, "peer_credentials", lambda sock: PeerCredentials(pid=99, uid=4242, gid=4242))
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        assert poke_command.main(["--socket", str(path), "inb", "0x80"]) == REFUSED
        line = capsys.readouterr().err
        assert line.count("\n") == 1
        assert line.startswith(f"{PROG}: error: the socket {path} is served by uid 4242 (pid 99), not a user")
        assert "add one with --server-uid" in line
        assert poke_command.main(
            ["--socket", str(path), "--server-uid", "4242", "--timeout", "0.1", "inb", "0x80"]
        ) == (UNREACHABLE)
        assert (
            capsys.readouterr().err == f"{PROG}: error: the service at {path} did not answer the HELLO within 0.1 s\n"
        )


def test_without_xdg_runtime_dir_a_user_must_name_the_socket(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as exited:
        poke_command.main(["inb", "0x80"])
    assert exited.value.code == USAGE
    assert capsys.readouterr().err == (
        f"{PROG}: error: argument --socket: no default socket path: XDG_RUNTIME_DIR is not set; set it "
        "(to a directory only you can write) or pass --socket PATH\n"
    )
