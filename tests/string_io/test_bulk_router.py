"""Bulk handlers in the router: installed beside an element claim, removed with it."""

from __future__ import annotations

import pytest

from dispatcher import (
    Access,
    BulkAccess,
    OverlappingClaimError,
    PortAccess,
    Router,
    RoutingError,
    on_bulk,
    on_port,
)


def element(access: PortAccess) -> int:
    return 0


def chunk(access: BulkAccess) -> bytes:
    return bytes(access.elements * access.size)


class Disk:
    io_base = 0x170

    @on_port(0, count=8)
    def registers(self, access: PortAccess) -> int:
        return 0

    @on_bulk(0)
    def data(self, access: BulkAccess) -> bytes:
        return bytes(access.elements * access.size)


def test_a_bulk_handler_needs_an_element_claim_in_each_direction() -> None:
    router = Router()
    with pytest.raises(RoutingError, match="no READ claim"):
        router.add_bulk(chunk, 0x1F0)
    router.add(element, 0x1F0, access="w")
    with pytest.raises(RoutingError, match="no READ claim"):
        router.add_bulk(chunk, 0x1F0)
    claim = router.add_bulk(chunk, 0x1F0, access="w")
    assert router.bulk_write_table[0x1F0] is claim and 0x1F0 not in router.bulk_read_table
    with pytest.raises(OverlappingClaimError):
        router.add_bulk(chunk, 0x1F0, access="w")


def test_removing_the_element_claim_removes_its_bulk_handler() -> None:
    router = Router()
    claim = router.add(element, 0x1F0, 8)
    bulk = router.add_bulk(chunk, 0x1F0)
    before = router.bulk_claims
    router.remove(claim)
    assert before == (bulk,) and router.bulk_claims == ()
    assert not router.bulk_read_table and not router.bulk_write_table
    with pytest.raises(RoutingError):
        router.remove(bulk)


def test_include_installs_bulk_marks_after_port_marks_and_copies_routers() -> None:
    router = Router()
    claims = router.include(Disk())
    assert [(c.first, c.last) for c in claims] == [(0x170, 0x177)]
    (bulk,) = router.bulk_claims
    assert (bulk.first, bulk.last, bulk.access) == (0x170, 0x170, Access.READ_WRITE) and not bulk.is_async
    copy = Router()
    copy.include(router)
    assert copy.bulk_read_table[0x170].handler == bulk.handler
    router.remove(bulk)
    assert router.bulk_claims == () and router.lookup(0x170, write=False) is not None


def test_include_of_a_bulk_mark_without_its_port_mark_installs_nothing() -> None:
    class Broken:
        @on_port(1)
        def status(self, access: PortAccess) -> int:
            return 0

        @on_bulk(0)
        def data(self, access: BulkAccess) -> bytes:
            return b""

    router = Router()
    with pytest.raises(RoutingError):
        router.include(Broken())
    assert router.claims == () and router.bulk_claims == ()
