"""Allow files: parsing, matching, and errors that name the file, the entry and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.allow import AllowError, load_allow, parse_allow

GOOD = """
[[allow]]
ports = "0x40-0x43"
direction = "in"
mask = 0xff
reason = "the PIT counts time"

[[allow]]
ports = 0x61
reason = "refresh toggles"
"""


def test_entries_parse_and_match() -> None:
    allow = parse_allow(GOOD, source="pit.toml")
    assert len(allow) == 2
    first, second = allow.entries
    assert (first.first, first.last, first.direction, first.mask, first.number) == (0x40, 0x43, "in", 0xFF, 1)
    assert (second.first, second.last, second.direction, second.mask) == (0x61, 0x61, None, None)
    assert allow.find(0x40, 1, False, ["rax"], 0x12, 0x34) is first
    assert allow.find(0x40, 1, True, ["rax"], 0x12, 0x34) is None  # a write: direction "in" only
    assert allow.find(0x40, 2, False, ["rax"], 0x1234, 0x3434) is None  # a bit outside the mask
    assert allow.find(0x40, 1, False, ["status", "rax"], 0, 0xFF) is None  # a mask allows the value only
    assert allow.find(0x43, 2, False, ["rax"], 0, 1) is None  # runs past the range
    assert allow.find(0x61, 1, True, ["status"], 0, 0) is second  # no mask: any difference


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[allow]]\nports = 1\n", "a.toml: allow entry 1: reason: missing"),
        ('[[allow]]\nreason = "x"\n', "a.toml: allow entry 1: ports: missing"),
        ('[[allow]]\nports = 1\nreason = "x"\nmsak = 1\n', "a.toml: allow entry 1: msak: unknown key"),
        ('[[allow]]\nports = 1\nreason = "x"\n[[allow]]\nports = "9-3"\nreason = "y"\n', "allow entry 2: ports:"),
        ('[[allow]]\nports = "0x10000"\nreason = "x"\n', "allow entry 1: ports: '0x10000' is not a range"),
        ('[[allow]]\nports = "pit"\nreason = "x"\n', "allow entry 1: ports: 'pit' is not a port or a range"),
        ('[[allow]]\nports = 1\ndirection = "both"\nreason = "x"\n', "allow entry 1: direction: 'both'"),
        ('[[allow]]\nports = 1\nmask = 0\nreason = "x"\n', "allow entry 1: mask: 0 is not a bit mask"),
        ('[[allow]]\nports = 1\nreason = "  "\n', "allow entry 1: reason: must be a non-empty string"),
        ("ports = 1\n", "a.toml: ports: unknown key"),
        ("[[allow]\n", "a.toml: not valid TOML"),
    ],
)
def test_errors_name_file_entry_and_key(text: str, message: str) -> None:
    with pytest.raises(AllowError) as caught:
        parse_allow(text, source="a.toml")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_files_are_read(tmp_path: Path) -> None:
    path = tmp_path / "known.toml"
    path.write_text(GOOD)
    assert len(load_allow(path)) == 2
    with pytest.raises(AllowError, match=r"missing\.toml: No such file"):
        load_allow(tmp_path / "missing.toml")
