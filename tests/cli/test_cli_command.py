"""The ``intercept-dispatch`` command itself: --version, help texts, one-line usage errors, and the version
the package reports."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dispatcher
from examples.cli import COMMAND_STATUSES, DEMO_STATUSES
from transports.service.command_line import USAGE, CommandParser, exit_status_text

ROOT = Path(__file__).resolve().parents[2]


def command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examples", *args], capture_output=True, text=True, timeout=120, check=False
    )


def installed_version() -> str:
    try:
        return importlib.metadata.version("intercept-dispatch")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("intercept-dispatch is not installed (pip install -e .)")


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr.rstrip("\n")


def exit_statuses(help_text: str) -> dict[int, str]:
    """The "exit status:" block of a --help text, as {status: meaning}."""
    block = help_text.split("exit status:\n", 1)[1]
    return {int(m[1]): " ".join(m[2].split()) for m in re.finditer(r"^  (\d+) +(.+(?:\n {4,}.+)*)", block, re.M)}


def test_version_prints_the_installed_version() -> None:
    version = installed_version()
    result = command("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"intercept-dispatch {version}\n", "")


def test_the_console_script_prints_the_same_version() -> None:
    script = Path(sys.executable).parent / "intercept-dispatch"
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable} (pip install -e .)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120, check=False)
    assert (result.returncode, result.stdout) == (0, f"intercept-dispatch {installed_version()}\n")


def test_the_package_version_comes_from_the_metadata() -> None:
    assert dispatcher.__version__ == installed_version()


def test_the_package_version_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    assert dispatcher.__version__  # computed and kept; the monkeypatch below puts it back afterwards
    monkeypatch.delitem(vars(dispatcher), "__version__")  # so the next access computes it again
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert dispatcher.__version__ == "0+unknown"


def test_help_lists_the_commands_and_the_exit_statuses() -> None:
    result = command("--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: intercept-dispatch [-h] [--version] COMMAND ...")
    for name in ("demo", "serve", "poke", "stats", "inspect"):
        assert re.search(rf"^    {name} +\w", result.stdout, re.M), f"{name} has no help line"
    assert exit_statuses(result.stdout) == {
        **COMMAND_STATUSES,
        USAGE: "usage error (the line printed says what was wrong)",
    }


def test_demo_help_describes_it_and_lists_its_exit_statuses() -> None:
    result = command("demo", "--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: intercept-dispatch demo [-h]")
    assert "Boot a small real-mode guest on a KVM vCPU" in result.stdout
    assert exit_statuses(result.stdout) == {
        **DEMO_STATUSES,
        USAGE: "usage error (the line printed says what was wrong)",
    }


@pytest.mark.parametrize("name", ["serve", "poke", "stats", "inspect"])
def test_the_service_commands_answer_their_own_help(name: str) -> None:
    result = command(name, "--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith(f"usage: intercept-dispatch {name} ")
    assert "\nexit status:\n" in result.stdout
    # Nothing internal shows: helper functions' names, argparse's default metavars of private destinations.
    assert not re.search(r"\b_\w+", result.stdout), result.stdout


@pytest.mark.parametrize(
    ("args", "line"),
    [
        ((), "intercept-dispatch: error: the following arguments are required: COMMAND"),
        (("demo", "--fast"), "intercept-dispatch demo: error: unrecognized arguments: --fast"),
        (("--bogus",), "intercept-dispatch: error: the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_are_one_line(args: tuple[str, ...], line: str) -> None:
    result = command(*args)
    assert result.returncode == USAGE
    assert one_line(result) == line


def test_an_unknown_command_lists_the_known_ones() -> None:
    result = command("bogus")
    assert result.returncode == USAGE
    line = one_line(result)
    assert line.startswith("intercept-dispatch: error: argument COMMAND: invalid choice: 'bogus'")
    assert all(name in line for name in ("demo", "serve", "poke", "stats", "inspect"))


def test_a_command_parser_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    parser = CommandParser(prog="tool", description="A tool.", exit_statuses={0: "done"})
    parser.add_argument("--count", type=int)
    with pytest.raises(SystemExit) as exit_status:
        parser.parse_args(["--count", "many"])
    assert exit_status.value.code == USAGE
    assert capsys.readouterr().err == "tool: error: argument --count: invalid int value: 'many'\n"


def test_exit_status_text_orders_and_wraps() -> None:
    statuses: dict[int | str, str] = {2: "usage", 0: "done", "1, 3 ... 255": "odd ones " * 12}
    text = exit_status_text(statuses, width=40)
    assert text.split("\n")[:3] == ["exit status:", "  0             done", "  1, 3 ... 255  odd ones odd ones odd"]
    assert text.split("\n")[-1] == "  2             usage"
    assert all(len(line) <= 40 for line in text.split("\n"))
