"""The architecture's rules, checked: a sans-I/O core, and no import from core to transports or examples."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The anyio layer and the command line are the only core modules allowed anyio.
ANYIO_ALLOWED = {"loop.py", "__main__.py", "__init__.py"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_core_imports_no_transport_and_no_example() -> None:
    for path in sorted((ROOT / "dispatcher").glob("*.py")):
        if path.name == "__main__.py":  # the command line is the application layer
            continue
        bad = {m for m in imported_modules(path) if m.split(".")[0] in ("transports", "examples")}
        assert not bad, f"{path.name} imports {bad}"


def test_the_sans_io_modules_do_not_import_anyio() -> None:
    for path in sorted((ROOT / "dispatcher").glob("*.py")):
        if path.name in ANYIO_ALLOWED:
            continue
        assert not {m for m in imported_modules(path) if m.split(".")[0] in ("anyio", "trio", "asyncio")}, path.name


def test_decoding_and_dispatch_decisions_load_without_anyio() -> None:
    code = (
        "import sys, importlib.util, types\n"
        "sys.modules['anyio'] = None\n"  # any import of anyio now fails
        "spec = importlib.util.spec_from_file_location('dispatcher', None, submodule_search_locations=['dispatcher'])\n"
        "pkg = types.ModuleType('dispatcher'); pkg.__path__ = ['dispatcher']; sys.modules['dispatcher'] = pkg\n"
        "import dispatcher.engine, dispatcher.message, dispatcher.completion, dispatcher.router\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


def test_examples_use_only_the_public_api() -> None:
    for path in sorted((ROOT / "examples").rglob("*.py")):
        for module in imported_modules(path):
            top, _, rest = module.partition(".")
            if top == "dispatcher":
                assert not rest, f"{path.relative_to(ROOT)} imports private module {module}"
