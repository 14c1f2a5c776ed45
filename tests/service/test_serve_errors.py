"""``serve`` refuses what it cannot use with one line on stderr naming what was wrong, and the listed exit status."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from service_helpers import HERE, SERVE_ARGS

PROG = "intercept-dispatch serve: error: "
FAILED, USAGE = 1, 2


def serve(*args: str, prelude: str = "", wrapper: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """``intercept-dispatch serve ARGS`` in a child; ``prelude`` runs first (e.g. to hide a package).

    ``wrapper`` is a command that runs the child's Python (e.g. as another user).
    """
    program = f"import sys\n{prelude}\nfrom examples.cli import main\nsys.exit(main(['serve', *sys.argv[1:]]))"
    return subprocess.run(
        [*wrapper, sys.executable, "-c", program, *args],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line of stderr, checked to be the command's one-line error."""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(PROG), result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.removeprefix(PROG).rstrip("\n")


def test_a_missing_socket_directory_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "s.sock"
    result = serve(*SERVE_ARGS, "--socket", str(path))
    assert result.returncode == FAILED
    assert one_line(result) == f"cannot listen on {path}: the directory {tmp_path / 'nowhere'} does not exist"


@pytest.fixture
def unwritable_directory() -> Iterator[tuple[Path, int, list[str]]]:
    """A directory the service may enter but not write; the uid it runs as, and the command that makes it so.

    Root passes every permission check, so as root the service runs as the
    user nobody (through util-linux's setpriv).
    """
    uid, wrapper = os.getuid(), []
    if uid == 0:
        setpriv = shutil.which("setpriv")
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root, and there is no user 'nobody' to be refused as")
        if setpriv is None:
            pytest.skip("running as root, and setpriv (util-linux) is not here to run the service as nobody")
        uid, wrapper = (
            nobody.pw_uid,
            [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"],
        )
        probe = subprocess.run([*wrapper, sys.executable, "-c", "import examples"], cwd=HERE, capture_output=True,
                               timeout=60, check=False)  # fmt: skip
        if probe.returncode != 0:
            pytest.skip("the user nobody cannot run this Python and project here")
    directory = Path(tempfile.mkdtemp(prefix="intercept-dispatch-test-"))
    directory.chmod(0o555)
    try:
        yield directory, uid, wrapper
    finally:
        directory.chmod(0o755)
        shutil.rmtree(directory)


def test_an_unwritable_socket_directory_is_named(unwritable_directory: tuple[Path, int, list[str]]) -> None:
    directory, uid, wrapper = unwritable_directory
    result = serve(*SERVE_ARGS, "--socket", str(directory / "s.sock"), wrapper=wrapper)
    assert result.returncode == FAILED
    assert one_line(result) == (
        f"cannot listen on {directory / 's.sock'}: permission denied: this user (uid {uid}) cannot create a file "
        f"in {directory}"
    )


def test_a_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    result = serve(*SERVE_ARGS, "--socket", str(path))
    assert result.returncode == FAILED
    assert one_line(result) == f"cannot listen on {path}: exists and is not a socket; not replacing it"
    assert path.read_text() == "keep me"


def test_a_socket_path_too_long_for_a_unix_address(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 120)
    result = serve(*SERVE_ARGS, "--socket", str(path))
    assert result.returncode == FAILED
    assert one_line(result).endswith("a UNIX socket path may have at most 107")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("deadline = \n", "line 1, column 12: invalid value"),
        ("deadline = 5\n[devices\n", "line 2, column 9: expected ']' at the end of a table declaration"),
        ("socket = ", "line 1, column 10: invalid value (the file ends there)"),
    ],
    ids=["no value", "unclosed table", "at the end"],
)
def test_a_config_file_that_is_not_toml_names_file_line_and_column(tmp_path: Path, text: str, where: str) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(text)
    result = serve(*SERVE_ARGS, "--config", str(config))
    assert result.returncode == USAGE
    assert one_line(result) == f"config file {config}, {where}"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("deadline = -1", "deadline: -1 is out of range (0 to 86400 seconds)"),
        ('grace = "soon"', "grace: 'soon' is not a number of seconds"),
        ("mode = 660", "mode: 0o1224 is not a file mode from 000 to 777 in octal (e.g. '0660')"),
        ("metrics_port = 99999", "metrics_port: 99999 is not a TCP port (0 to 65535; 0 picks a free one)"),
        ("allow_uid = [-5]", "allow_uid: -5 is not a user id (0 to 4294967294)"),
        ("stdio = 1", "stdio: 1 is not true or false"),
        ("colour = true", "unknown setting(s) colour; known: address_space, allow_uid, backend"),
    ],
)
def test_a_bad_value_in_the_config_file_is_named(tmp_path: Path, text: str, why: str) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(text + "\n")
    result = serve(*SERVE_ARGS, "--config", str(config))
    assert result.returncode == USAGE
    assert one_line(result).startswith(f"config file {config}: {why}")


def test_an_unreadable_config_file_is_named(tmp_path: Path) -> None:
    result = serve(*SERVE_ARGS, "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == USAGE
    assert one_line(result) == f"config file {tmp_path / 'absent.toml'}: cannot read it: No such file or directory"


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--deadline", "-1"], "argument --deadline: -1 is out of range (0 to 86400 seconds)"),
        (["--deadline", "nan"], "argument --deadline: nan is out of range (0 to 86400 seconds)"),
        (["--grace", "-0.5"], "argument --grace: -0.5 is out of range (0 to 86400 seconds)"),
        (["--grace", "1e9"], "argument --grace: 1e+09 is out of range (0 to 86400 seconds)"),
        (["--stats-interval", "0.01"], "argument --stats-interval: 0.01 is out of range (0 or 0.1 to 86400 seconds)"),
        (["--stats-interval", "inf"], "argument --stats-interval: inf is out of range (0 or 0.1 to 86400 seconds)"),
        (["--mode", "1777"], "argument --mode: '1777' is not a file mode from 000 to 777 in octal (e.g. '0660')"),
        (["--allow-uid", "4294967295"], "argument --allow-uid: 4294967295 is not a user id (0 to 4294967294)"),
        (["--allow-uid", "no-such-user"], "argument --allow-uid: there is no user named 'no-such-user'"),
        (["--metrics-port", "65536"], "argument --metrics-port: 65536 is not a TCP port (0 to 65535; 0 picks"),
        (["--metrics-address", "127.0.0.1"], "--metrics-address needs --metrics-port"),
        (["--backend", "curio"], "argument --backend: 'curio' is not one of asyncio, trio, uvloop"),
        (["-v", "-q"], "argument -q/--quiet: not allowed with argument -v/--verbose"),
    ],
)
def test_every_numeric_option_is_checked_against_its_range(args: Sequence[str], why: str) -> None:
    result = serve(*SERVE_ARGS, *args)
    assert result.returncode == USAGE
    assert one_line(result).startswith(why)


def test_a_backend_whose_package_is_missing_is_named_with_its_extra(tmp_path: Path) -> None:
    # sys.modules[name] = None makes importing it fail as if it were not installed.
    result = serve(*SERVE_ARGS, "--backend", "trio", "--socket", str(tmp_path / "s.sock"),
                   prelude="sys.modules['trio'] = None")  # fmt: skip
    assert result.returncode == USAGE
    assert one_line(result) == "--backend trio needs the trio package: pip install 'intercept-dispatch[trio]'"
    assert not (tmp_path / "s.sock").exists()


def test_metrics_without_prometheus_client_name_the_extra(tmp_path: Path) -> None:
    result = serve(*SERVE_ARGS, "--metrics-port", "0", "--socket", str(tmp_path / "s.sock"),
                   prelude="sys.modules['prometheus_client'] = None")  # fmt: skip
    assert result.returncode == USAGE
    assert one_line(result) == (
        "--metrics-port needs the prometheus_client package: pip install 'intercept-dispatch[metrics]'"
    )


def test_a_metrics_port_in_use_is_named(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client", reason="the metrics endpoint needs the [metrics] extra")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(*SERVE_ARGS, "--metrics-port", str(port), "--socket", str(tmp_path / "s.sock"))
    assert result.returncode == FAILED
    assert one_line(result) == f"cannot serve metrics on 127.0.0.1 port {port}: Address already in use"
    assert not (tmp_path / "s.sock").exists()


def test_devices_that_cannot_be_loaded_are_named(tmp_path: Path) -> None:
    result = serve("--device", "no_such_module:router", "--socket", str(tmp_path / "s.sock"))
    assert result.returncode == FAILED
    assert one_line(result).startswith("cannot load the devices: device 'no_such_module:router': cannot import")


def test_help_lists_the_exit_statuses() -> None:
    result = serve("--help")
    assert result.returncode == 0
    statuses = result.stdout.partition("exit status:")[2]
    for status in (0, 1, 2):
        assert f"\n  {status}  " in statuses, result.stdout
    assert "-v, --verbose" in result.stdout and "-q, --quiet" in result.stdout
