"""What the package ships beside its code: the license, declared for the wheel, and the changelog."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_license_is_mit_for_the_authors() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the intercept-dispatch authors\n")
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def test_the_project_declares_the_license_file() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]


def test_the_installed_metadata_names_the_license_file() -> None:
    # What the build made of the declaration: the wheel's METADATA lists the file it ships (in .dist-info/licenses/).
    try:
        metadata = importlib.metadata.metadata("intercept-dispatch")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("intercept-dispatch is not installed (pip install -e .)")
    assert "LICENSE" in (metadata.get_all("License-File") or []), "reinstall: pip install -e ."
    assert metadata["License-Expression"] == "MIT"


def test_the_changelog_has_an_entry_for_this_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(version)}\b", changelog, re.M), f"CHANGELOG.md has no entry for {version}"
