"""Port claims: which handler answers which port, in which direction.

A :class:`Router` is an explicit table; nothing is registered at import
time. :func:`on_port` only marks a function or method, and
:meth:`Router.include` collects the marks of a module or a device object,
in the way pluggy collects hook implementations.

String I/O (REP INS/OUTS) reaches the ``on_port`` handler once per element.
A device that can take a whole chunk at once (a disk's data port) also
installs a bulk handler for the port with :func:`on_bulk` or
:meth:`Router.add_bulk`.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias, TypeVar

from .announce import PortRange
from .errors import OverlappingClaimError, RoutingError
from .fields import Access

__all__ = [
    "PORT_LIMIT",
    "Access",
    "BulkAccess",
    "BulkClaim",
    "BulkHandler",
    "Claim",
    "Handler",
    "PortAccess",
    "Router",
    "on_bulk",
    "on_port",
]

# An access at port 0xFFFF of size 4 reaches three ports past it; the tables
# cover them so lookups need no bounds check. They are never claimable.
PORT_LIMIT = 0x10000
_TABLE_SIZE = PORT_LIMIT + 3


class PortAccess(NamedTuple):
    """What a handler is called with: one access to its claim.

    For a write, ``value`` holds the ``size`` bytes written; for a read it is
    0 and the handler returns the value read. ``offset`` is ``port`` less the
    first port of the claim.
    """

    #: The port accessed: the lowest one, for an access wider than a byte.
    port: int
    #: Bytes accessed: 1, 2 or 4 (1 for each byte of an access split into bytes).
    size: int
    #: True for OUT and OUTS (the guest writes), False for IN and INS (it reads).
    is_write: bool
    #: For a write, the ``size`` bytes written (the low bytes of RAX), as an int; 0 for a read.
    value: int
    #: ``port`` less the first port of the claim: which of the claim's ports is accessed.
    offset: int
    #: The index of the virtual processor that executed the instruction.
    vp_index: int
    #: The partition (the guest) that VP belongs to.
    partition: int


class BulkAccess(NamedTuple):
    """What a bulk handler is called with: ``elements`` elements of a string access at once.

    Elements are ``size`` bytes, little-endian, in the order the instruction
    moves them (whatever RFLAGS.DF). For OUTS (``is_write``), ``data`` holds
    the ``elements * size`` bytes written; for INS it is empty and the handler
    returns exactly ``elements * size`` bytes (``bytes``, ``bytearray`` or
    ``memoryview``). ``offset`` is ``port`` less the first port of the claim.
    """

    #: The port accessed.
    port: int
    #: Bytes per element: 1, 2 or 4.
    size: int
    #: How many elements this call moves.
    elements: int
    #: True for OUTS (the guest writes), False for INS (it reads).
    is_write: bool
    #: For OUTS, the ``elements * size`` bytes written; empty for INS.
    data: bytes
    #: ``port`` less the first port of the claim.
    offset: int
    #: The index of the virtual processor that executed the instruction.
    vp_index: int
    #: The partition (the guest) that VP belongs to.
    partition: int


HandlerResult: TypeAlias = int | Awaitable[int | None] | None
Handler: TypeAlias = Callable[[PortAccess], HandlerResult]
"""A port handler: called with a :class:`PortAccess`, returns the value read (an int) or, for a write, None.

An ``async def`` handler is awaited.
"""
BulkData: TypeAlias = bytes | bytearray | memoryview
BulkResult: TypeAlias = BulkData | Awaitable[BulkData | None] | None
BulkHandler: TypeAlias = Callable[[BulkAccess], BulkResult]
"""A bulk handler: called with a :class:`BulkAccess`, returns the bytes read or, for OUTS, None.

An ``async def`` handler is awaited.
"""
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True, eq=False)
class Claim:
    """An installed claim: ports ``first..last`` in the given directions."""

    first: int
    last: int
    access: Access
    handler: Handler
    is_async: bool
    max_size: int = 4

    @property
    def name(self) -> str:
        return getattr(self.handler, "__qualname__", repr(self.handler))


@dataclass(frozen=True, slots=True, eq=False)
class BulkClaim:
    """An installed bulk handler: string accesses to ports ``first..last`` in the given directions."""

    first: int
    last: int
    access: Access
    handler: BulkHandler
    is_async: bool

    @property
    def name(self) -> str:
        return getattr(self.handler, "__qualname__", repr(self.handler))


@dataclass(frozen=True, slots=True)
class _Mark:
    port: int
    count: int
    access: Access
    max_size: int


_MARKS = "__intercept_dispatch_ports__"
_BULK_MARKS = "__intercept_dispatch_bulk_ports__"


def _access(access: Access | str) -> Access:
    if isinstance(access, str):
        try:
            return {"r": Access.READ, "w": Access.WRITE, "rw": Access.READ_WRITE}[access]
        except KeyError:
            raise ValueError(f"access must be 'r', 'w' or 'rw', not {access!r}") from None
    return Access(access)


def on_port(
    port: int, count: int = 1, *, access: Access | str = Access.READ_WRITE, max_size: int = 4
) -> Callable[[F], F]:
    """Mark a function or method as the handler of ``count`` ports from ``port``.

    The mark installs nothing; a router installs it with
    :meth:`Router.include`. On a device object the port is an offset from the
    base given to ``include`` (by default the object's ``io_base``). The
    arguments are those of :meth:`Router.add`:

    :param port: the first port, or for a method of a device object, its offset from the object's base.
    :param count: how many consecutive ports from ``port`` the handler serves (``PortAccess.offset`` says which).
    :param access: the directions served: ``"r"`` (IN), ``"w"`` (OUT) or ``"rw"`` (both, the default), or an
        :class:`Access`. The other direction stays unclaimed, free for another handler.
    :param max_size: the widest access, 1, 2 or 4 bytes, the handler takes whole; a wider one reaches it as
        byte accesses.
    :raises ValueError: if ``access`` or ``max_size`` is none of those values.
    """
    mark = _Mark(port, count, _access(access), _max_size(max_size))

    def decorate(func: F) -> F:
        setattr(func, _MARKS, (*getattr(func, _MARKS, ()), mark))
        return func

    return decorate


def on_bulk(port: int, count: int = 1, *, access: Access | str = Access.READ_WRITE) -> Callable[[F], F]:
    """Mark a function or method as the bulk handler of ``count`` ports from ``port``.

    Installed by :meth:`Router.include` like :func:`on_port` marks (after
    them); the arguments are those of :meth:`Router.add_bulk`.
    """
    mark = _Mark(port, count, _access(access), 4)

    def decorate(func: F) -> F:
        setattr(func, _BULK_MARKS, (*getattr(func, _BULK_MARKS, ()), mark))
        return func

    return decorate


def _max_size(max_size: int) -> int:
    if max_size not in (1, 2, 4):
        raise ValueError(f"max_size must be 1, 2 or 4, not {max_size}")
    return max_size


def _is_async(handler: Callable[..., Any]) -> bool:
    # An object whose __call__ is a coroutine function is awaited too.
    return inspect.iscoroutinefunction(handler) or (
        not inspect.isroutine(handler) and inspect.iscoroutinefunction(type(handler).__call__)
    )


class Router:
    """The port table: O(1) lookup per access, claims installed and removed at run time."""

    def __init__(self) -> None:
        self._read: list[Claim | None] = [None] * _TABLE_SIZE
        self._write: list[Claim | None] = [None] * _TABLE_SIZE
        self._claims: list[Claim] = []
        self._bulk_read: dict[int, BulkClaim] = {}
        self._bulk_write: dict[int, BulkClaim] = {}
        self._bulk_claims: list[BulkClaim] = []

    def __repr__(self) -> str:
        # Compact: the first few claims by port (ports, directions, handler), then how many more.
        shown, directions = 4, {Access.READ: "r", Access.WRITE: "w", Access.READ_WRITE: "rw"}
        claims = sorted(self._claims, key=lambda claim: (claim.first, claim.access))
        if not claims:
            text = "no claims"
        else:
            listed = [
                f"{c.first:#x}{f'-{c.last:#x}' if c.last != c.first else ''} {directions[c.access]} {c.name}"
                for c in claims[:shown]
            ]
            if len(claims) > shown:
                listed.append(f"... {len(claims) - shown} more")
            text = f"{len(claims)} claim{'s' if len(claims) != 1 else ''}: {', '.join(listed)}"
        if self._bulk_claims:
            bulk = len(self._bulk_claims)
            text += f"; {bulk} bulk handler{'s' if bulk != 1 else ''}"
        return f"<Router {text}>"

    # The dispatcher reads these tables directly on its hot path.
    @property
    def read_table(self) -> list[Claim | None]:
        return self._read

    @property
    def write_table(self) -> list[Claim | None]:
        return self._write

    @property
    def bulk_read_table(self) -> dict[int, BulkClaim]:
        return self._bulk_read

    @property
    def bulk_write_table(self) -> dict[int, BulkClaim]:
        return self._bulk_write

    def add(
        self,
        handler: Handler,
        port: int,
        count: int = 1,
        *,
        access: Access | str = Access.READ_WRITE,
        max_size: int = 4,
    ) -> Claim:
        """Install ``handler`` for ``count`` ports from ``port``; return the claim.

        ``access`` is the directions served ("r", "w" or "rw"); the other
        direction stays unclaimed. An access wider than ``max_size`` bytes
        reaches the handler as byte accesses, as an 8-bit device on a wider
        bus sees it.

        :param handler: called with a :class:`PortAccess` for each access; for a read it returns the value
            read (masked to the access size), for a write its result is ignored. It may be ``async def``.
        :param port: the first port claimed, 0x0000..0xFFFF.
        :param count: how many consecutive ports from ``port`` the handler serves (``PortAccess.offset`` says
            which).
        :param access: the directions served: ``"r"`` (IN), ``"w"`` (OUT) or ``"rw"`` (both, the default), or
            an :class:`Access`. The other direction stays unclaimed, free for another handler.
        :param max_size: the widest access, 1, 2 or 4 bytes, the handler takes whole.
        :returns: the installed claim, for :meth:`remove`.
        :raises RoutingError: if the ports run outside 0x0000..0xFFFF.
        :raises OverlappingClaimError: if one of the ports is claimed already in one of the same directions.
        :raises ValueError: if ``access`` or ``max_size`` is none of the values above.
        """
        direction = _access(access)
        last = port + count - 1
        if count < 1 or port < 0 or last >= PORT_LIMIT:
            raise RoutingError(f"ports {port:#x}+{count} are outside 0x0000..0xffff")
        claim = Claim(port, last, direction, handler, _is_async(handler), _max_size(max_size))
        tables = [t for flag, t in ((Access.READ, self._read), (Access.WRITE, self._write)) if direction & flag]
        for table in tables:
            for p in range(port, last + 1):
                other = table[p]
                if other is not None:
                    raise OverlappingClaimError(
                        f"{claim.name} claims port {p:#x} ({direction.name}), "
                        f"already claimed by {other.name} for {other.first:#x}..{other.last:#x}"
                    )
        for table in tables:
            table[port : last + 1] = [claim] * count
        self._claims.append(claim)
        return claim

    def claim(
        self, port: int, count: int = 1, *, access: Access | str = Access.READ_WRITE, max_size: int = 4
    ) -> Callable[[F], F]:
        """Decorator form of :meth:`add`: install the decorated function at once.

        (The module-level :func:`on_port` only marks a function for a later
        :meth:`include`.) The decorated function is returned unchanged.

        :param port: the first port claimed, 0x0000..0xFFFF.
        :param count: how many consecutive ports from ``port`` the function serves.
        :param access: the directions served: ``"r"``, ``"w"`` or ``"rw"`` (the default), or an :class:`Access`.
        :param max_size: the widest access, 1, 2 or 4 bytes, the function takes whole.
        :raises RoutingError: (or ``ValueError``) as :meth:`add` does, when the function is decorated.
        """

        def decorate(func: F) -> F:
            self.add(func, port, count, access=access, max_size=max_size)
            return func

        return decorate

    def add_bulk(
        self, handler: BulkHandler, port: int, count: int = 1, *, access: Access | str = Access.READ_WRITE
    ) -> BulkClaim:
        """Install ``handler`` to take string accesses (REP INS/OUTS) to these ports a chunk at a time.

        Each port must already be claimed by an :meth:`add` handler in the
        same directions; that handler keeps answering IN and OUT, and its
        removal removes this one. Raises ``RoutingError`` otherwise, and
        ``OverlappingClaimError`` if another bulk handler has one of the ports.
        """
        direction = _access(access)
        last = port + count - 1
        if count < 1 or port < 0 or last >= PORT_LIMIT:
            raise RoutingError(f"ports {port:#x}+{count} are outside 0x0000..0xffff")
        claim = BulkClaim(port, last, direction, handler, _is_async(handler))
        tables = self._bulk_tables(direction)
        for flag, table in tables:
            elements = self._read if flag is Access.READ else self._write
            for p in range(port, last + 1):
                other = table.get(p)
                if other is not None:
                    raise OverlappingClaimError(
                        f"{claim.name} takes bulk port {p:#x} ({flag.name}), "
                        f"already taken by {other.name} for {other.first:#x}..{other.last:#x}"
                    )
                if elements[p] is None:
                    raise RoutingError(f"{claim.name}: bulk port {p:#x} has no {flag.name} claim to go with it")
        for _, table in tables:
            table.update(dict.fromkeys(range(port, last + 1), claim))
        self._bulk_claims.append(claim)
        return claim

    def _bulk_tables(self, direction: Access) -> list[tuple[Access, dict[int, BulkClaim]]]:
        return [(f, t) for f, t in ((Access.READ, self._bulk_read), (Access.WRITE, self._bulk_write)) if direction & f]

    def remove(self, claim: Claim | BulkClaim) -> None:
        """Uninstall a claim; its ports become unclaimed (and lose the bulk handlers that went with it)."""
        if isinstance(claim, BulkClaim):
            try:
                self._bulk_claims.remove(claim)
            except ValueError:
                raise RoutingError(f"{claim.name} at {claim.first:#x} is not installed here") from None
            for _, bulk_table in self._bulk_tables(claim.access):
                for p in range(claim.first, claim.last + 1):
                    del bulk_table[p]
            return
        try:
            self._claims.remove(claim)
        except ValueError:
            raise RoutingError(f"{claim.name} at {claim.first:#x} is not installed here") from None
        for flag, table in ((Access.READ, self._read), (Access.WRITE, self._write)):
            if claim.access & flag:
                table[claim.first : claim.last + 1] = [None] * (claim.last - claim.first + 1)
        for bulk in list(self._bulk_claims):
            if bulk.first <= claim.last and claim.first <= bulk.last and bulk.access & claim.access:
                self.remove(bulk)

    def include(self, source: object, *, base: int | None = None) -> list[Claim]:
        """Install the claims of another router, or the marked handlers of a module or object.

        For a router, its claims are copied as they are. Otherwise each
        :func:`on_port` mark is installed at ``base`` plus its port, then each
        :func:`on_bulk` mark; ``base`` defaults to the object's ``io_base``
        attribute, else 0. All or none are installed. Returns the
        :func:`on_port` claims (removing them removes the bulk ones too).
        """
        if isinstance(source, Router):
            wanted = [(c.handler, c.first, c.last - c.first + 1, c.access, c.max_size) for c in source._claims]
            bulk = [(b.handler, b.first, b.last - b.first + 1, b.access) for b in source._bulk_claims]
        else:
            offset = getattr(source, "io_base", 0) if base is None else base
            wanted = [
                (handler, offset + mark.port, mark.count, mark.access, mark.max_size)
                for handler, mark in _marked(source, _MARKS)
            ]
            bulk = [(handler, offset + m.port, m.count, m.access) for handler, m in _marked(source, _BULK_MARKS)]
        installed: list[Claim] = []
        try:
            for handler, port, count, access, max_size in wanted:
                installed.append(self.add(handler, port, count, access=access, max_size=max_size))
            for bulk_handler, port, count, access in bulk:
                self.add_bulk(bulk_handler, port, count, access=access)
        except RoutingError:
            for claim in installed:
                self.remove(claim)
            raise
        return installed

    def lookup(self, port: int, *, write: bool) -> Claim | None:
        """The claim that serves ``port`` in that direction, if any."""
        return (self._write if write else self._read)[port]

    @property
    def claims(self) -> tuple[Claim, ...]:
        """The installed claims, in the order they were added."""
        return tuple(self._claims)

    @property
    def bulk_claims(self) -> tuple[BulkClaim, ...]:
        """The installed bulk handlers, in the order they were added."""
        return tuple(self._bulk_claims)

    def port_ranges(self) -> list[PortRange]:
        """The claimed ports as sorted ranges with their directions, merged where adjacent."""
        ranges: list[PortRange] = []
        for port in range(PORT_LIMIT):
            access = (self._read[port] is not None) | (self._write[port] is not None) << 1
            if not access:
                continue
            if ranges and ranges[-1].last == port - 1 and ranges[-1].access == access:
                ranges[-1] = ranges[-1]._replace(last=port)
            else:
                ranges.append(PortRange(port, port, Access(access)))
        return ranges


def _marked(source: object, attribute: str) -> Iterator[tuple[Any, _Mark]]:
    seen: list[object] = []
    for name in dir(source):
        if name.startswith("__"):
            continue
        try:
            value = getattr(source, name)
        except AttributeError:
            continue
        marks: Iterable[_Mark] = getattr(value, attribute, ())
        # A function reachable under two names is installed once.
        function = getattr(value, "__func__", value)
        if not marks or not callable(value) or any(function is f for f in seen):
            continue
        seen.append(function)
        for mark in marks:
            yield value, mark
