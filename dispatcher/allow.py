"""Allow files: the differences a replay accepts, each with the reason it is not a bug.

An allow file is TOML (read with the standard library's ``tomllib``), one
``[[allow]]`` table per accepted difference::

    [[allow]]
    ports = "0x40-0x43"        # one port ("0x61", 0x61) or a range "FIRST-LAST"
    direction = "in"           # "in" or "out"; both when absent
    mask = 0xff                # bits of the value read that may differ; all of them when absent
    reason = "the PIT counter reads the time, which QEMU's run and ours spend differently"

    [[allow]]
    ports = "0x71"
    direction = "in"
    index = { port = "0x70", mask = 0x7f, values = ["0x00-0x09", "0x32"] }  # only these CMOS registers
    reason = "the clock's time and century, which the two runs read at different moments"

A completion that differs from the trace's is allowed when the whole access
lies in ``ports``, its direction matches, and either no ``mask`` is given
(any difference of that access is accepted, status included) or the only
field that differs is RAX and every differing bit of the value (masked to
the access size) is in ``mask``. ``reason`` is required: the replay prints it
beside each allowed difference.

``index`` narrows an entry on a data port behind an index port to some
registers: the entry applies only when the last value the guest wrote to
``index.port`` before this access (by any VP, of any size), ANDed with
``index.mask`` (all ones when absent), is one of ``index.values`` (numbers
or "FIRST-LAST" ranges). Before the first write to that port, or after a
string write to it (whose value is in guest memory), the entry does not apply.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Final

from .errors import DispatchError

__all__ = ["AllowEntry", "AllowError", "AllowIndex", "AllowList", "load_allow", "parse_allow"]

_KEYS: Final = frozenset({"ports", "direction", "mask", "index", "reason"})
_INDEX_KEYS: Final = frozenset({"port", "mask", "values"})
_SIZE_MASK: Final = (0, 0xFF, 0xFFFF, 0xFF_FFFF, 0xFFFF_FFFF)
_ALL_ONES: Final = 0xFFFF_FFFF
_NO_INDEXES: Final[Mapping[int, int]] = {}


class AllowError(DispatchError):
    """An allow file that cannot be used; the message names the file, the entry (1-based) and the key."""

    def __init__(self, reason: str, *, source: str, entry: int | None = None, key: str | None = None) -> None:
        where = source
        if entry is not None:
            where += f": allow entry {entry}"
        if key is not None:
            where += f": {key}"
        super().__init__(f"{where}: {reason}")
        self.reason = reason
        self.source = source
        self.entry = entry
        self.key = key


@dataclass(frozen=True, slots=True)
class AllowIndex:
    """An entry's ``index``: the last value written to ``port``, ANDed with ``mask``, must lie in one of the
    inclusive ranges ``values`` (a single value is a range of one)."""

    port: int
    mask: int
    values: tuple[tuple[int, int], ...]

    def matches(self, indexes: Mapping[int, int]) -> bool:
        """Whether ``indexes`` (port -> last value written) selects a register this condition names."""
        value = indexes.get(self.port)
        if value is None:
            return False
        value &= self.mask
        return any(first <= value <= last for first, last in self.values)


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """One ``[[allow]]`` table: ports ``first``-``last``, ``direction`` ("in", "out" or None for both),
    ``mask`` (None: any difference), ``reason``, ``index`` (None: whatever the index ports hold);
    ``number`` is its place in the file (from 1)."""

    first: int
    last: int
    direction: str | None
    mask: int | None
    reason: str
    number: int = 0
    index: AllowIndex | None = None

    def covers(self, port: int, size: int, is_write: bool) -> bool:
        """Whether an access of ``size`` bytes at ``port`` in that direction falls under this entry."""
        if self.direction is not None and (self.direction == "out") != is_write:
            return False
        return self.first <= port and port + max(size, 1) - 1 <= self.last

    def allows(
        self,
        port: int,
        size: int,
        is_write: bool,
        fields: Collection[str],
        expected: int,
        got: int,
        indexes: Mapping[int, int] = _NO_INDEXES,
    ) -> bool:
        """Whether a completion whose ``fields`` differ (RAX ``expected`` against ``got``) is accepted,
        ``indexes`` being the last value written to each index port before the access."""
        if not self.covers(port, size, is_write):
            return False
        if self.index is not None and not self.index.matches(indexes):
            return False
        if self.mask is None:
            return True
        if set(fields) != {"rax"}:
            return False
        changed = (expected ^ got) & _SIZE_MASK[size if 0 < size <= 4 else 4]
        return changed & ~self.mask == 0


@dataclass(frozen=True, slots=True)
class AllowList:
    """The entries of an allow file (or none), checked in file order."""

    entries: tuple[AllowEntry, ...] = ()
    source: str = ""

    @property
    def index_ports(self) -> frozenset[int]:
        """The ports some entry's ``index`` names: the ones whose writes a replay must follow."""
        return frozenset(entry.index.port for entry in self.entries if entry.index is not None)

    def find(
        self,
        port: int,
        size: int,
        is_write: bool,
        fields: Collection[str],
        expected: int,
        got: int,
        indexes: Mapping[int, int] = _NO_INDEXES,
    ) -> AllowEntry | None:
        """The first entry that accepts this difference, or None; ``indexes`` maps each of
        :attr:`index_ports` to the last value written to it before this access (absent: none yet)."""
        for entry in self.entries:
            if entry.allows(port, size, is_write, fields, expected, got, indexes):
                return entry
        return None

    def __len__(self) -> int:
        return len(self.entries)


def load_allow(path: str | os.PathLike[str]) -> AllowList:
    """Read an allow file; raise :class:`AllowError` naming the file, entry and key that is wrong."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            data = file.read()
    except OSError as error:
        raise AllowError(error.strerror or str(error), source=source) from None
    try:
        text = data.decode()
    except UnicodeDecodeError as error:
        raise AllowError(f"not UTF-8 text (byte {error.start})", source=source) from None
    return parse_allow(text, source=source)


def parse_allow(text: str, *, source: str = "<allow>") -> AllowList:
    """Parse an allow file's text (see the module's documentation for the format)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise AllowError(f"not valid TOML: {error}", source=source) from None
    unknown = sorted(set(document) - {"allow"})
    if unknown:
        raise AllowError("unknown key (the file holds [[allow]] tables only)", source=source, key=unknown[0])
    tables = document.get("allow", [])
    if not isinstance(tables, list):
        raise AllowError("must be an array of tables, written [[allow]]", source=source, key="allow")
    entries = []
    for number, table in enumerate(tables, 1):
        if not isinstance(table, dict):
            raise AllowError("must be a table", source=source, entry=number)
        entries.append(_entry(table, source, number))
    return AllowList(tuple(entries), source)


_Fail = Callable[[str, str], AllowError]


def _entry(table: Mapping[str, object], source: str, number: int) -> AllowEntry:
    def fail(key: str, reason: str) -> AllowError:
        return AllowError(reason, source=source, entry=number, key=key)

    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key (known: {', '.join(sorted(_KEYS))})")
    for key in ("ports", "reason"):
        if key not in table:
            raise fail(key, "missing (every entry needs ports and a reason)")
    reason = table["reason"]
    if not isinstance(reason, str) or not reason.strip():
        raise fail("reason", "must be a non-empty string saying why the difference is not a bug")
    first, last = _ports(table["ports"], "ports", fail)
    direction = table.get("direction")
    if direction is not None and direction not in ("in", "out"):
        raise fail("direction", f'{direction!r} is neither "in" nor "out"')
    mask = _mask(table.get("mask"), "mask", fail)
    index = _index(table["index"], fail) if "index" in table else None
    return AllowEntry(first, last, direction, mask, reason.strip(), number, index)


def _mask(mask: object, key: str, fail: _Fail) -> int | None:
    if mask is not None and (isinstance(mask, bool) or not isinstance(mask, int) or not 0 < mask <= _ALL_ONES):
        raise fail(key, f"{mask!r} is not a bit mask from 0x1 to 0xffffffff")
    return mask


def _index(table: object, fail: _Fail) -> AllowIndex:
    if not isinstance(table, dict):
        raise fail("index", f'{table!r} is not a table like {{ port = "0x70", values = ["0x0c"] }}')
    unknown = sorted(set(table) - _INDEX_KEYS)
    if unknown:
        raise fail(f"index.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_INDEX_KEYS))})")
    for key in ("port", "values"):
        if key not in table:
            raise fail(f"index.{key}", "missing (an index needs the port written and the values that apply)")
    first, last = _ports(table["port"], "index.port", fail)
    if first != last:
        raise fail("index.port", f"{table['port']!r} is a range; the index is one port")
    mask = _mask(table.get("mask"), "index.mask", fail)
    mask = _ALL_ONES if mask is None else mask
    values = table["values"]
    if not isinstance(values, list) or not values:
        raise fail("index.values", f'{values!r} is not a non-empty array like ["0x0c", "0x00-0x09"]')
    ranges = []
    for value in values:
        low, high = _span(value, 0, _ALL_ONES, "index.values", "a value", '"0x00-0x09"', fail)
        if low == high and low & ~mask:
            raise fail("index.values", f"{value!r} has bits outside the mask {mask:#x}, so it never matches")
        ranges.append((low, high))
    return AllowIndex(first, mask, tuple(ranges))


def _ports(value: object, key: str, fail: _Fail) -> tuple[int, int]:
    return _span(value, 0, 0xFFFF, key, "a port", '"0x40-0x43"', fail)


def _span(value: object, low: int, high: int, key: str, what: str, example: str, fail: _Fail) -> tuple[int, int]:
    """A number or a "FIRST-LAST" range (int or string) within ``low``-``high``."""

    def bad(reason: str) -> AllowError:
        return fail(key, reason)

    if isinstance(value, bool):
        raise bad(f"{value!r} is not {what} or a range")
    if isinstance(value, int):
        first = last = value
    elif isinstance(value, str):
        text = value.strip()
        start, dash, end = text.partition("-")
        try:
            first = int(start.strip(), 0)
            last = int(end.strip(), 0) if dash else first
        except ValueError:
            raise bad(f"{value!r} is not {what} or a range like {example}") from None
    else:
        raise bad(f"{value!r} is not {what} or a range like {example}")
    if not low <= first <= last <= high:
        plural = "ports" if what == "a port" else "values"
        raise bad(f"{value!r} is not a range of {plural} from {low} to {high:#x}, first to last")
    return first, last
