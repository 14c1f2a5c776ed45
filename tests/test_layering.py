"""The architecture's rules, checked from the code's imports (docs/ARCHITECTURE.md lists them).

Layers, from the top: the application (examples/, the command line), the
service (transports/service/, and the test bench's commands in
transports/testbench/, which load devices as the service does), the
transports (byte movers and KVM), the core (dispatcher/). Imports run downwards only, with no cycle, and the core
loads anyio only for its anyio layer.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dispatcher", "transports", "examples")
ANYIO_LAYER = {"dispatcher.loop"}  # the one core module that may import anyio


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imports(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports, relative imports resolved (TYPE_CHECKING ones included)."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from pkg import mod" names a module when pkg.mod is one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # "import a.b.c" of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target.split(".")[0] in PACKAGES:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    return {name: imports(name, path) for name, path in modules().items()}


def layer(name: str) -> int:
    if name.startswith("examples"):
        return 3
    if name.startswith(("transports.service", "transports.testbench")):
        return 2
    if name.startswith("transports"):
        return 1
    return 0


LAYER_NAMES = ("the core", "a transport", "the service", "the application")


def test_imports_run_downwards_only() -> None:
    # The core imports no transport and no example; no transport imports the service or an example;
    # the service imports no example (so its default device set comes from the application).
    upward = [
        f"{name} ({LAYER_NAMES[layer(name)]}) imports {target} ({LAYER_NAMES[layer(target)]})"
        for name, targets in graph().items()
        for target in targets
        if layer(target) > layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_there_is_no_import_cycle() -> None:
    edges = graph()
    # A module's package __init__ re-exporting it is not a cycle of dependence: drop package -> own submodule.
    edges = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(edges):
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"


def test_only_the_anyio_layer_of_the_core_imports_anyio() -> None:
    for name, path in modules().items():
        if layer(name) or name in ANYIO_LAYER:
            continue
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {n for n in names if n.split(".")[0] in ("anyio", "trio", "asyncio")}, name


def test_the_core_loads_without_anyio() -> None:
    core = sorted(name for name in modules() if not layer(name) and name not in ANYIO_LAYER)
    code = (
        "import sys\n"
        "sys.modules['anyio'] = None\n"  # any import of anyio now fails
        f"import {', '.join(core)}\n"
        "import dispatcher\n"
        "assert 'anyio' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


def test_examples_use_only_the_public_api_of_the_core() -> None:
    for name, targets in graph().items():
        if layer(name) == 3:
            private = {t for t in targets if t.startswith("dispatcher.")}
            assert not private, f"{name} imports core modules {private}: use 'from dispatcher import ...'"


@pytest.mark.parametrize(
    ("source", "rule"),
    [
        ("dispatcher/engine.py", "import transports.memory\n"),
        ("transports/unix.py", "from examples import uart\n"),
        ("transports/fdstream.py", "from .service import server\n"),
    ],
)
def test_the_rules_catch_a_broken_import(source: str, rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The checks above would fail for each of these: the graph sees the added import as upward.
    path = ROOT / source
    original = Path.read_text

    def with_rule(self: Path, *args: object, **kwargs: object) -> str:
        text = original(self)
        return text + rule if self == path else text

    monkeypatch.setattr(Path, "read_text", with_rule)
    with pytest.raises(AssertionError, match="imports"):
        test_imports_run_downwards_only()
