"""Allow files: the differences a replay accepts, each with the reason it is not a bug.

An allow file is TOML (read with the standard library's ``tomllib``), one
``[[allow]]`` table per accepted difference::

    [[allow]]
    ports = "0x40-0x43"        # one port ("0x61", 0x61) or a range "FIRST-LAST"
    direction = "in"           # "in" or "out"; both when absent
    mask = 0xff                # bits of the value read that may differ; all of them when absent
    reason = "the PIT counter reads the time, which QEMU's run and ours spend differently"

A completion that differs from the trace's is allowed when the whole access
lies in ``ports``, its direction matches, and either no ``mask`` is given
(any difference of that access is accepted, status included) or the only
field that differs is RAX and every differing bit of the value (masked to
the access size) is in ``mask``. ``reason`` is required: the replay prints it
beside each allowed difference.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Final

from .errors import DispatchError

__all__ = ["AllowEntry", "AllowError", "AllowList", "load_allow", "parse_allow"]

_KEYS: Final = frozenset({"ports", "direction", "mask", "reason"})
_SIZE_MASK: Final = (0, 0xFF, 0xFFFF, 0xFF_FFFF, 0xFFFF_FFFF)


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
class AllowEntry:
    """One ``[[allow]]`` table: ports ``first``-``last``, ``direction`` ("in", "out" or None for both),
    ``mask`` (None: any difference), ``reason``; ``number`` is its place in the file (from 1)."""

    first: int
    last: int
    direction: str | None
    mask: int | None
    reason: str
    number: int = 0

    def covers(self, port: int, size: int, is_write: bool) -> bool:
        """Whether an access of ``size`` bytes at ``port`` in that direction falls under this entry."""
        if self.direction is not None and (self.direction == "out") != is_write:
            return False
        return self.first <= port and port + max(size, 1) - 1 <= self.last

    def allows(self, port: int, size: int, is_write: bool, fields: Collection[str], expected: int, got: int) -> bool:
        """Whether a completion whose ``fields`` differ (RAX ``expected`` against ``got``) is accepted."""
        if not self.covers(port, size, is_write):
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

    def find(
        self, port: int, size: int, is_write: bool, fields: Collection[str], expected: int, got: int
    ) -> AllowEntry | None:
        """The first entry that accepts this difference, or None."""
        for entry in self.entries:
            if entry.allows(port, size, is_write, fields, expected, got):
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
    first, last = _ports(table["ports"], fail)
    direction = table.get("direction")
    if direction is not None and direction not in ("in", "out"):
        raise fail("direction", f'{direction!r} is neither "in" nor "out"')
    mask = table.get("mask")
    if mask is not None and (isinstance(mask, bool) or not isinstance(mask, int) or not 0 < mask <= 0xFFFF_FFFF):
        raise fail("mask", f"{mask!r} is not a bit mask from 0x1 to 0xffffffff")
    return AllowEntry(first, last, direction, mask, reason.strip(), number)


def _ports(value: object, fail: Callable[[str, str], AllowError]) -> tuple[int, int]:
    def bad(reason: str) -> AllowError:
        return fail("ports", reason)

    if isinstance(value, bool):
        raise bad(f"{value!r} is not a port or a range")
    if isinstance(value, int):
        first = last = value
    elif isinstance(value, str):
        text = value.strip()
        low, dash, high = text.partition("-")
        try:
            first = int(low.strip(), 0)
            last = int(high.strip(), 0) if dash else first
        except ValueError:
            raise bad(f'{value!r} is not a port or a range like "0x40-0x43"') from None
    else:
        raise bad(f'{value!r} is not a port or a range like "0x40-0x43"')
    if not 0 <= first <= last <= 0xFFFF:
        raise bad(f"{value!r} is not a range of ports from 0 to 0xffff, first to last")
    return first, last
