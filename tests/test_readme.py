"""README's examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from dispatcher import Router

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_device_test_in_readme_passes(tmp_path: Path) -> None:
    [block] = [b for b in python_blocks() if b.startswith("# test_scratch.py")]
    assert len(block.splitlines()) <= 30
    (tmp_path / "test_scratch.py").write_text(block)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_scratch.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b[12] passed", result.stdout) and "failed" not in result.stdout  # one test, per backend


def test_the_device_class_example_in_readme_runs() -> None:
    [block] = [b for b in python_blocks() if "class Latch" in b]
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    router = namespace["router"]
    assert isinstance(router, Router)
    assert router.lookup(0x511, write=False) is not None
    assert router.lookup(0x521, write=True) is not None


def test_the_demo_passes() -> None:
    result = subprocess.run([sys.executable, "-m", "examples", "demo"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Hello from the guest" in result.stdout and "demo passed" in result.stdout
