"""docs/TESTING.md's test files run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "TESTING.md"


def guide_test_files() -> dict[str, str]:
    """The guide's code blocks that are whole test files, by the name their first line gives."""
    blocks = re.findall(r"```python\n(# (test_\w+\.py)\n.*?)```", GUIDE.read_text(), re.S)
    return {name: block for block, name in blocks}


def test_the_guide_s_test_files_pass(tmp_path: Path) -> None:
    files = guide_test_files()
    assert len(files) >= 4, sorted(files)
    for name, block in files.items():
        (tmp_path / name).write_text(block)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sorted(files)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed[1]) >= len(files), result.stdout  # every file ran (async tests on both backends)
    assert "failed" not in result.stdout and "skipped" not in result.stdout
