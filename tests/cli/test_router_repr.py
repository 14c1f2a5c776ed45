"""``repr(Router)``: the claims at a glance (ports, directions, handler), a few of them."""

from __future__ import annotations

from dispatcher import BulkAccess, PortAccess, Router, on_port


def reader(access: PortAccess) -> int:
    return 0


class I8042:
    io_base = 0x60

    @on_port(0)
    def data(self, access: PortAccess) -> int:
        return 0

    @on_port(4)
    def command(self, access: PortAccess) -> int:
        return 0


def test_an_empty_router() -> None:
    assert repr(Router()) == "<Router no claims>"


def test_one_claim() -> None:
    router = Router()
    router.add(reader, 0x3FF, access="r")
    assert repr(router) == "<Router 1 claim: 0x3ff r reader>"


def test_claims_in_port_order_with_ranges_and_directions() -> None:
    router = Router()
    router.include(I8042())
    router.add(reader, 0x40, 3, access="w")
    assert repr(router) == "<Router 3 claims: 0x40-0x42 w reader, 0x60 rw I8042.data, 0x64 rw I8042.command>"


def test_many_claims_are_cut_short() -> None:
    router = Router()
    for port in range(0x100, 0x10A):
        router.add(reader, port)
    assert repr(router) == (
        "<Router 10 claims: 0x100 rw reader, 0x101 rw reader, 0x102 rw reader, 0x103 rw reader, ... 6 more>"
    )


def test_a_read_and_a_write_claim_of_one_port() -> None:
    router = Router()
    router.add(reader, 0x80, access="w")
    router.add(reader, 0x80, access="r")
    assert repr(router) == "<Router 2 claims: 0x80 r reader, 0x80 w reader>"


def test_bulk_handlers_are_counted() -> None:
    def chunk(access: BulkAccess) -> bytes:
        return bytes(access.elements * access.size)

    router = Router()
    router.add(reader, 0x1F0)
    router.add_bulk(chunk, 0x1F0)
    assert repr(router) == "<Router 1 claim: 0x1f0 rw reader; 1 bulk handler>"
