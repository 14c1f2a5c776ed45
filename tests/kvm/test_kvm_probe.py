"""What KVM reports at I/O exits: invariants that hold on every KVM back end.

The back-end-specific facts (e.g. whether RIP is already past an OUT at the
exit) are documented in docs/KVM.md from ``python -m transports.kvm.probe``;
here only what the framework may rely on everywhere is asserted.
"""

from __future__ import annotations

import pytest
from kvm_support import requires_kvm

from dispatcher.x86 import decode_io_instruction
from examples.guests import guest_bytes
from transports.kvm.probe import ProbeExit, run_probe

pytestmark = requires_kvm

MODES = ("real", "protected32", "long64")
BITS = {"real": 16, "protected32": 32, "long64": 64}


@pytest.fixture(scope="module")
def exits() -> list[ProbeExit]:
    result: list[ProbeExit] = run_probe(guest_bytes("io_probe"), complete=True)
    return result


def _decode(e: ProbeExit) -> tuple[int, bool, int]:
    image = guest_bytes("io_probe")
    offset = e.insn_addr - 0x7C00
    insn = decode_io_instruction(image[offset : offset + 15], BITS[e.mode])
    return insn.length, insn.string, insn.size


def test_every_mode_and_case_exits(exits: list[ProbeExit]) -> None:
    seen = {(e.mode, e.case) for e in exits}
    for mode in MODES:
        assert {case for m, case in seen if m == mode} == set(range(1, 17)), mode  # case 17: REP with RCX=0


def test_exit_matches_the_decoded_instruction(exits: list[ProbeExit]) -> None:
    for e in exits:
        _length, string, size = _decode(e)
        assert e.size == size
        assert e.count >= 1
        assert (e.count > 1) <= string  # only string I/O batches
        assert e.data_offset >= 304 and len(e.data) == e.size * e.count


def test_in_exits_stop_at_the_instruction(exits: list[ProbeExit]) -> None:
    for e in exits:
        if not e.is_write:
            assert e.rip_delta_at_exit == 0, (e.mode, e.case)


def test_completed_non_string_io_has_advanced_rip(exits: list[ProbeExit]) -> None:
    for e in exits:
        length, string, _ = _decode(e)
        if not string:
            assert e.rip_delta_completed == length, (e.mode, e.case)
            assert e.rip_delta_at_exit in (0, length)  # OUT: depends on the KVM back end


def test_completed_in_merges_the_accumulator_architecturally(exits: list[ProbeExit]) -> None:
    for e in exits:
        _, string, size = _decode(e)
        if not e.is_write and not string:
            assert e.completed is not None
            before = e.before[3]
            value = int.from_bytes(e.data, "little")
            expected = value if size == 4 else (before & ~((1 << (8 * size)) - 1)) | value
            assert e.completed[4] == expected, (e.mode, e.case)


def test_string_io_walks_memory_in_kvm(exits: list[ProbeExit]) -> None:
    """Over all exits of one string case, counts add up and RCX/RDI/RSI end where the CPU would leave them."""
    by_case: dict[tuple[str, int], list[ProbeExit]] = {}
    for e in exits:
        if _decode(e)[1]:
            by_case.setdefault((e.mode, e.case), []).append(e)
    assert by_case
    for (mode, case), group in by_case.items():
        first, last = group[0], group[-1]
        rep = case not in (11, 12)
        total = sum(e.count for e in group)
        step = first.size * (-1 if case in (13, 14) else 1)
        assert last.completed is not None
        if rep:
            assert total == first.before[0], (mode, case)
            assert last.completed[1] == 0
        else:
            assert total == 1
        if not first.is_write:
            assert last.completed[3] == first.before[2] + step * total, (mode, case)
        else:
            assert last.completed[2] == first.before[1] + step * total, (mode, case)
