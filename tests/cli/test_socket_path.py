"""Where the socket lives by default, and the bind directory check: no socket where another user could
replace it, each refusal naming the directory, its mode and owner, and why."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from transports.socket_path import (
    ROOT_SOCKET_DIRECTORY,
    SocketPathError,
    UnsafeDirectoryError,
    check_bind_directory,
    default_socket_path,
)

OTHER_UID = 4242  # a user id that is not ours
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")


def test_the_default_is_in_xdg_runtime_dir() -> None:
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/1000"}) == "/run/user/1000/intercept-dispatch.sock"


def test_without_xdg_runtime_dir_root_uses_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_socket_path({}) == f"{ROOT_SOCKET_DIRECTORY}/intercept-dispatch.sock"


def test_without_xdg_runtime_dir_a_user_has_no_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SocketPathError, match=r"XDG_RUNTIME_DIR is not set; set it .* or pass --socket PATH$"):
        default_socket_path({"XDG_RUNTIME_DIR": ""})


def private_directory(tmp_path: Path, mode: int) -> Path:
    directory = tmp_path / "d"
    directory.mkdir()
    directory.chmod(mode)
    return directory


@pytest.mark.parametrize("mode", [0o700, 0o755, 0o750])
def test_a_directory_only_we_can_write_is_accepted(tmp_path: Path, mode: int) -> None:
    check_bind_directory(private_directory(tmp_path, mode) / "s.sock")


@pytest.mark.parametrize(("mode", "shown"), [(0o770, "0770"), (0o757, "0757"), (0o777, "0777")])
def test_a_directory_others_may_write_is_refused_naming_mode_and_owner(tmp_path: Path, mode: int, shown: str) -> None:
    directory = private_directory(tmp_path, mode)
    with pytest.raises(UnsafeDirectoryError) as raised:
        check_bind_directory(directory / "s.sock")
    assert str(raised.value) == (
        f"refusing to listen in {directory} (mode {shown}, owner uid {os.geteuid()}): other users may write in it, "
        "so they could replace the socket; use a directory only you can write"
    )
    assert (raised.value.directory, raised.value.mode, raised.value.owner) == (str(directory), mode, os.geteuid())


def test_a_sticky_directory_is_accepted_while_the_path_is_free_or_ours(tmp_path: Path) -> None:
    directory = private_directory(tmp_path, 0o1777)
    check_bind_directory(directory / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as ours:
        ours.bind(str(directory / "s.sock"))
        check_bind_directory(directory / "s.sock")


@as_root
def test_a_sticky_directory_with_another_users_file_at_the_path_is_refused(tmp_path: Path) -> None:
    directory = private_directory(tmp_path, 0o1777)
    squatted = directory / "s.sock"
    squatted.write_text("")
    os.chown(squatted, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafeDirectoryError, match=re.escape(f"{squatted} already exists there, owned by uid 4242")):
        check_bind_directory(squatted)


@as_root
@pytest.mark.parametrize("mode", [0o700, 0o1777])
def test_a_directory_of_another_user_is_refused_even_sticky(tmp_path: Path, mode: int) -> None:
    directory = private_directory(tmp_path, mode)
    os.chown(directory, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafeDirectoryError) as raised:
        check_bind_directory(directory / "s.sock")
    assert str(raised.value).startswith(f"refusing to listen in {directory} (mode {mode:04o}, owner uid 4242): ")
    assert "it belongs to another user" in str(raised.value)


def test_create_makes_a_missing_directory_0755_whatever_the_umask(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    umask = os.umask(0o077)
    try:
        check_bind_directory(directory / "s.sock", create=True)
    finally:
        os.umask(umask)
    assert directory.stat().st_mode & 0o7777 == 0o755


def test_a_missing_directory_or_a_file_in_its_place_is_named(tmp_path: Path) -> None:
    with pytest.raises(SocketPathError, match=f"^cannot use the directory {re.escape(str(tmp_path / 'no'))}: "):
        check_bind_directory(tmp_path / "no" / "s.sock")
    with pytest.raises(SocketPathError, match=f"^cannot create the directory {re.escape(str(tmp_path / 'a' / 'b'))}"):
        check_bind_directory(tmp_path / "a" / "b" / "s.sock", create=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(SocketPathError, match=r"it is not a directory$"):
        check_bind_directory(tmp_path / "file" / "s.sock")
