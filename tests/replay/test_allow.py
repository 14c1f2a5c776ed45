"""Allow files: parsing, matching, and errors that name the file, the entry and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.allow import AllowError, AllowIndex, load_allow, parse_allow

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


CMOS = """
[[allow]]
ports = "0x71"
direction = "in"
index = { port = "0x70", mask = 0x7f, values = ["0x00-0x09", "0x0c", 0x38] }
reason = "time, register C and boot order"

[[allow]]
ports = "0x71"
direction = "in"
mask = 0x80
index = { port = 0x70, values = ["0x0a"] }
reason = "UIP"

[[allow]]
ports = "0xcfc-0xcff"
index = { port = "0xcf8", mask = 0x80ffff00, values = ["0x80000b00"] }
reason = "function 00:01.3"
"""


def test_an_index_parses() -> None:
    cmos, uip, pci = parse_allow(CMOS, source="cmos.toml").entries
    assert cmos.index == AllowIndex(0x70, 0x7F, ((0x00, 0x09), (0x0C, 0x0C), (0x38, 0x38)))
    assert uip.index == AllowIndex(0x70, 0xFFFF_FFFF, ((0x0A, 0x0A),))  # no mask: all ones
    assert pci.index == AllowIndex(0xCF8, 0x80FF_FF00, ((0x8000_0B00, 0x8000_0B00),))
    assert parse_allow(CMOS).index_ports == {0x70, 0xCF8}
    assert parse_allow(GOOD).index_ports == frozenset()
    assert parse_allow(GOOD).entries[0].index is None


def test_an_index_entry_applies_only_after_a_write_of_a_listed_register() -> None:
    allow = parse_allow(CMOS)
    cmos, uip, pci = allow.entries
    assert allow.find(0x71, 1, False, ["rax"], 0, 1) is None  # no write to 0x70 yet
    assert allow.find(0x71, 1, False, ["rax"], 0, 1, {0xCF8: 0x0C}) is None  # a write to another index port
    for register in (0x00, 0x05, 0x09, 0x0C, 0x38):
        assert allow.find(0x71, 1, False, ["rax"], 0, 1, {0x70: register}) is cmos
    for register in (0x0B, 0x0D, 0x10, 0x37, 0x39):
        assert allow.find(0x71, 1, False, ["rax"], 0, 1, {0x70: register}) is None
    assert allow.find(0x71, 1, False, ["rax"], 0, 1, {0x70: 0x8C}) is cmos  # NMI disable, masked off
    assert allow.find(0x71, 1, True, ["rax"], 0, 1, {0x70: 0x0C}) is None  # the direction still counts
    assert allow.find(0x71, 1, False, ["rax"], 0, 0x80, {0x70: 0x0A}) is uip
    assert allow.find(0x71, 1, False, ["rax"], 0, 0x81, {0x70: 0x0A}) is None  # a bit outside the value mask
    assert allow.find(0x71, 1, False, ["rax"], 0, 0x80, {0x70: 0x8A}) is None  # no index mask: bit 7 counts
    assert allow.find(0xCFC, 4, False, ["rax"], 0, 1, {0xCF8: 0x8000_0B3C}) is pci  # any register of 00:01.3
    assert allow.find(0xCFE, 2, False, ["rax"], 0, 1, {0xCF8: 0x8000_0B02}) is pci
    assert allow.find(0xCFC, 4, False, ["rax"], 0, 1, {0xCF8: 0x8000_0A3C}) is None  # function 2
    assert allow.find(0xCFC, 4, False, ["rax"], 0, 1, {0xCF8: 0x0000_0B3C}) is None  # configuration disabled
    assert allow.find(0xCFC, 4, False, ["rax"], 0, 1, {0xCF8: 0x8001_0B3C}) is None  # bus 1


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ('"0x70"', "allow entry 1: index: '0x70' is not a table"),
        ('{ port = "0x70", values = [1], size = 1 }', "allow entry 1: index.size: unknown key"),
        ("{ values = [1] }", "allow entry 1: index.port: missing"),
        ('{ port = "0x70" }', "allow entry 1: index.values: missing"),
        ('{ port = "0x70-0x71", values = [1] }', "allow entry 1: index.port: '0x70-0x71' is a range"),
        ('{ port = "cmos", values = [1] }', "allow entry 1: index.port: 'cmos' is not a port or a range"),
        ("{ port = 0x10000, values = [1] }", "allow entry 1: index.port: 65536 is not a range of ports"),
        ('{ port = "0x70", mask = 0, values = [1] }', "allow entry 1: index.mask: 0 is not a bit mask"),
        ('{ port = "0x70", mask = true, values = [1] }', "allow entry 1: index.mask: True is not a bit mask"),
        ('{ port = "0x70", values = [] }', "allow entry 1: index.values: [] is not a non-empty array"),
        ('{ port = "0x70", values = "0x0c" }', "allow entry 1: index.values: '0x0c' is not a non-empty array"),
        ('{ port = "0x70", values = ["0x0c", "c"] }', "allow entry 1: index.values: 'c' is not a value or a range"),
        ('{ port = "0x70", values = ["9-3"] }', "allow entry 1: index.values: '9-3' is not a range of values"),
        ('{ port = "0x70", values = [-1] }', "allow entry 1: index.values: -1 is not a range of values"),
        ('{ port = "0x70", values = [1.5] }', "allow entry 1: index.values: 1.5 is not a value or a range"),
        ('{ port = "0x70", mask = 0x7f, values = ["0x80"] }', "allow entry 1: index.values: '0x80' has bits outside"),
    ],
)
def test_index_errors_name_the_key(index: str, message: str) -> None:
    text = f'[[allow]]\nports = "0x71"\nindex = {index}\nreason = "x"\n'
    with pytest.raises(AllowError) as caught:
        parse_allow(text, source="a.toml")
    assert f"a.toml: {message}" in str(caught.value)
    assert "\n" not in str(caught.value)


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
