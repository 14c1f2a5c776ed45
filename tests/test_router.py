"""Installing, collecting and removing port claims."""

from __future__ import annotations

import types

import pytest

from dispatcher import Access, OverlappingClaimError, PortAccess, PortRange, Router, RoutingError, on_port


def reader(access: PortAccess) -> int:
    return 0


def handler_at(router: Router, port: int, *, write: bool) -> object:
    """The handler serving ``port`` in that direction, or None."""
    claim = router.lookup(port, write=write)
    return None if claim is None else claim.handler


def test_decorator_installs_a_claim_for_a_range() -> None:
    router = Router()

    @router.claim(0x3F8, 8)
    def uart(access: PortAccess) -> int:
        return 0

    for port in range(0x3F8, 0x400):
        assert handler_at(router, port, write=False) is uart
        assert handler_at(router, port, write=True) is uart
    assert router.lookup(0x3F7, write=False) is None
    assert router.lookup(0x400, write=True) is None


def test_read_only_and_write_only_claims_share_a_port() -> None:
    router = Router()
    read = router.add(reader, 0x60, access="r")
    write = router.add(reader, 0x60, access=Access.WRITE)
    assert router.lookup(0x60, write=False) is read
    assert router.lookup(0x60, write=True) is write


def test_overlapping_claim_is_refused_and_names_both() -> None:
    router = Router()
    router.add(reader, 0x70, 2)
    with pytest.raises(OverlappingClaimError, match=r"0x71.*0x70\.\.0x71"):
        router.add(reader, 0x71, 4, access="r")
    assert router.lookup(0x72, write=False) is None  # nothing of the refused claim was installed


@pytest.mark.parametrize(("port", "count"), [(-1, 1), (0xFFFF, 2), (0x10, 0)])
def test_claims_outside_the_port_space_are_refused(port: int, count: int) -> None:
    with pytest.raises(RoutingError):
        Router().add(reader, port, count)


def test_claims_are_removed_at_run_time() -> None:
    router = Router()
    claim = router.add(reader, 0x80)
    router.remove(claim)
    assert router.lookup(0x80, write=False) is None
    assert router.claims == ()
    with pytest.raises(RoutingError):
        router.remove(claim)
    router.add(reader, 0x80)  # the port is free again


class Device:
    io_base = 0x2F8

    @on_port(0, 8, max_size=1)
    def registers(self, access: PortAccess) -> int:
        return access.offset

    @on_port(8, access="w")
    def latch(self, access: PortAccess) -> None:
        pass


def test_include_collects_marks_of_an_object_relative_to_its_base() -> None:
    router = Router()
    device = Device()
    claims = router.include(device)
    assert sorted((c.first, c.last, c.access, c.max_size) for c in claims) == [
        (0x2F8, 0x2FF, Access.READ_WRITE, 1),
        (0x300, 0x300, Access.WRITE, 4),
    ]
    second = Router()
    second.include(Device(), base=0x3E8)
    assert second.lookup(0x3E8, write=False) is not None


def test_include_of_a_module_and_of_a_router() -> None:
    module = types.ModuleType("devices")

    @on_port(0x92)
    def port92(access: PortAccess) -> int:
        return 0

    vars(module).update(port92=port92, alias=port92)
    router = Router()
    assert len(router.include(module)) == 1  # one function under two names is installed once
    merged = Router()
    merged.include(router)
    assert handler_at(merged, 0x92, write=True) is port92


def test_include_is_all_or_nothing() -> None:
    router = Router()
    router.add(reader, 0x300)
    with pytest.raises(OverlappingClaimError):
        router.include(Device())
    assert router.lookup(0x2F8, write=False) is None


def test_async_handlers_are_recognised() -> None:
    router = Router()

    async def slow(access: PortAccess) -> int:
        return 0

    class Callable:
        async def __call__(self, access: PortAccess) -> int:
            return 0

    assert router.add(slow, 1).is_async
    assert router.add(Callable(), 2).is_async
    assert not router.add(reader, 3).is_async


def test_port_ranges_merge_adjacent_claims_of_the_same_direction() -> None:
    router = Router()
    router.add(reader, 0x20, 2)
    router.add(reader, 0x22, 1)
    router.add(reader, 0x60, access="r")
    router.add(reader, 0x61, access="w")
    assert router.port_ranges() == [
        PortRange(0x20, 0x22, Access.READ_WRITE),
        PortRange(0x60, 0x60, Access.READ),
        PortRange(0x61, 0x61, Access.WRITE),
    ]


def test_mark_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="access"):
        on_port(0x10, access="x")
    with pytest.raises(ValueError, match="max_size"):
        on_port(0x10, max_size=3)
