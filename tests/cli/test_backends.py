"""``serve --backend``: which event loops need which package, and the error that names the extra to install."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from dispatcher import DispatchError
from transports.service.backends import BACKENDS, BackendUnavailableError, check_backend
from transports.service.command_line import USAGE


def test_asyncio_needs_nothing() -> None:
    check_backend("asyncio")


@pytest.mark.parametrize("name", ["trio", "uvloop"])
def test_an_installed_backend_passes(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed here")
    check_backend(name)


@pytest.mark.parametrize("name", ["trio", "uvloop"])
def test_a_missing_backend_names_the_extra(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, name, None)  # what "not installed" looks like to an import
    with pytest.raises(BackendUnavailableError) as raised:
        check_backend(name)
    assert str(raised.value) == f"--backend {name} needs the {name} package: pip install 'intercept-dispatch[{name}]'"
    assert isinstance(raised.value, DispatchError)
    assert (raised.value.backend, raised.value.extra) == (name, name)


def test_a_backend_that_fails_to_import_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An installed uvloop whose own import fails (a dependency missing): not the same as no uvloop.
    (tmp_path / "uvloop").mkdir()
    (tmp_path / "uvloop" / "__init__.py").write_text("import intercept_dispatch_no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "uvloop", raising=False)
    with pytest.raises(BackendUnavailableError) as raised:
        check_backend("uvloop")
    assert str(raised.value) == (
        "--backend uvloop: the uvloop package does not import (No module named "
        "'intercept_dispatch_no_such_module'); try pip install 'intercept-dispatch[uvloop]'"
    )


def test_an_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(BackendUnavailableError) as raised:
        check_backend("gevent")
    assert str(raised.value) == "--backend gevent: unknown event loop (choose asyncio, trio, uvloop)"
    assert raised.value.extra is None


def test_every_extra_is_declared_in_the_package_metadata() -> None:
    # The extras the messages name exist: pyproject.toml declares each with the package it installs.
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for backend in BACKENDS.values():
        if backend.extra is not None:
            assert backend.module is not None
            assert any(requirement.startswith(backend.module) for requirement in extras[backend.extra]), backend


def serve(tmp_path: Path, backend: str, *, hide: str | None = None) -> subprocess.CompletedProcess[str]:
    """``intercept-dispatch serve --backend BACKEND``, with the package ``hide`` made impossible to import."""
    hiding = f"sys.modules[{hide!r}] = None; " if hide is not None else ""
    code = f"import sys; {hiding}from examples.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "serve", "--backend", backend, "--socket", str(tmp_path / "s.sock")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("name", ["trio", "uvloop"])
def test_serve_refuses_a_missing_backend_in_one_line(name: str, tmp_path: Path) -> None:
    result = serve(tmp_path, name, hide=name)
    assert result.returncode == USAGE
    assert result.stderr == (
        f"intercept-dispatch serve: error: --backend {name} needs the {name} package: "
        f"pip install 'intercept-dispatch[{name}]'\n"
    )
    assert not (tmp_path / "s.sock").exists()  # refused before anything was started
