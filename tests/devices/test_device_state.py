"""The device state API on every example device: save/restore round trips, power-on reset values, the golden
state files of earlier versions, and bad state files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from device_scenarios import GOLDEN, SCENARIOS, Machine, Op, Scenario, access, checks, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher import (
    DispatchError,
    PortAccess,
    Router,
    StateError,
    StateFields,
    devices_of,
    dump_state,
    load_state,
    on_port,
    reset_devices,
    restore_device,
    restore_devices,
    save_devices,
)
from dispatcher.device_state import FORMAT, is_stateful

GOLDEN_DIR = Path(__file__).parent / "golden"
SAVED_AT, RESTORED_AT = 1000.0, 777777.5  # the second machine's clock reads something else entirely


def ops(scenario: Scenario) -> st.SearchStrategy[list[Op]]:
    """Random guest accesses, clock moves and host actions for ``scenario``."""

    def io(port: int, sizes: tuple[int, ...]) -> st.SearchStrategy[Op]:
        size = st.sampled_from(sizes)
        value = st.integers(0, 0xFFFF_FFFF)
        if port in scenario.values:
            value = st.one_of(st.sampled_from(scenario.values[port]), value)
        write = st.tuples(st.just("out"), st.just(port), size, value)
        return st.one_of(write, st.tuples(st.just("in"), st.just(port), size))

    choices: list[st.SearchStrategy[Op]] = [io(port, sizes) for port, sizes in scenario.ports]
    choices.append(st.tuples(st.just("tick"), st.integers(0, 4096)))
    if scenario.host:
        choices.append(st.tuples(st.just("host"), st.sampled_from(sorted(scenario.host)), st.integers(0, 0x7FFFF)))
    return st.lists(st.one_of(choices), max_size=40)


def round_trip(machine: Machine, scenario: Scenario) -> Machine:
    """Save ``machine`` to JSON text, and restore it into a new machine whose clock reads another time."""
    text = dump_state(save_devices(machine.router))
    fresh = scenario.build(RESTORED_AT)
    for mine, theirs in zip(fresh.media, machine.media, strict=True):
        mine[:] = theirs  # the disk image is not device state: the VMM keeps it
    restore_devices(fresh.router, load_state(text, source="round trip"))
    return fresh


def relative(document: Mapping[str, Any]) -> str:
    return json.dumps(document, sort_keys=True)


# Port 0x61 alone reads its PIT, whose state is not on that router; the i8254 scenario serves both.
@pytest.mark.parametrize("name", sorted(set(SCENARIOS) - {"port61"}))
def test_round_trip_then_the_same_reads_follow(name: str) -> None:
    scenario = SCENARIOS[name]

    @settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
    @given(before=ops(scenario), after=ops(scenario))
    def check(before: list[Op], after: list[Op]) -> None:
        original = scenario.build(SAVED_AT)
        run(original, scenario, before)
        restored = round_trip(original, scenario)
        # Saved state is relative to the clock: the restored machine saves the same document.
        assert relative(save_devices(restored.router)) == relative(save_devices(original.router))
        assert [restored.irqs.level(line) for line in scenario.lines] == [
            original.irqs.level(line) for line in scenario.lines
        ]
        output_before = bytes(original.output)
        seen_original = run(original, scenario, after)
        seen_restored = run(restored, scenario, after)
        assert [(r, irq) for r, irq, _ in seen_restored] == [(r, irq) for r, irq, _ in seen_original]
        assert bytes(restored.output) == bytes(original.output)[len(output_before) :]
        assert restored.media == original.media

    check()


def test_no_guest_time_passes_while_saved() -> None:
    # The PIT counter, the RTC's seconds and a pending UART character timeout read, an hour after the save,
    # what they read at the save; then time runs on from there.
    m = SCENARIOS["pc"].build(SAVED_AT)
    for port, value in ((0x43, 0x34), (0x40, 0x00), (0x40, 0x80), (0x3FA, 0xC7), (0x3F9, 0x01), (0x3FC, 0x08)):
        access(m.router, port, 1, True, value)
    m.parts["pc"].uart.receive(b"x")
    m.clock.now += 1 / 1024  # less than the four character times (4.2 ms at 9600 baud) of the timeout
    text = dump_state(save_devices(m.router))
    access(m.router, 0x43, 1, True, 0x00)
    at_save = (inb(m, 0x40) | inb(m, 0x40) << 8, inb(m, 0x3FA))
    access(m.router, 0x70, 1, True, 0x00)
    seconds = inb(m, 0x71)
    later = SCENARIOS["pc"].build(SAVED_AT + 3600.0)
    later.media[0][:] = m.media[0]
    restore_devices(later.router, load_state(text, source="saved"))
    access(later.router, 0x43, 1, True, 0x00)
    assert (inb(later, 0x40) | inb(later, 0x40) << 8, inb(later, 0x3FA)) == at_save
    assert at_save[1] == 0xC1  # FIFOs on, no interrupt pending yet
    access(later.router, 0x70, 1, True, 0x00)
    assert inb(later, 0x71) == seconds
    later.clock.now += 1.0
    assert inb(later, 0x71) == seconds + 1  # BCD 0x50 + 1 second, no carry
    assert inb(later, 0x3FA) & 0x0F == 0x0C  # the character timeout has fired since


def test_restore_over_a_running_vm(pc: Machine) -> None:
    document = other_pc_document()
    restore_devices(pc.router, json.loads(dump_state(document)))
    assert relative(save_devices(pc.router)) == relative(document)


def test_every_example_device_declares_state() -> None:
    machine = SCENARIOS["pc"].build(SAVED_AT)
    found = devices_of(machine.router)
    owners = {id(c.handler.__self__) for c in machine.router.claims if hasattr(c.handler, "__self__")}
    assert len(found) == 13
    assert all(id(device) in owners or type(device).__name__ == "DebugExit" for device in found.values())
    assert sorted(found) == [
        "ata-channel@0x1f0",
        "debug-exit@0x501",
        "debugcon@0x402",
        "debugcon@0xe9",
        "i8042@0x60",
        "i8254@0x40",
        "i8259-pair@0x20",
        "mc146818@0x70",
        "pci-host@0xcf8",
        "port61@0x61",
        "port92@0x92",
        "post-codes@0x80",
        "uart16550@0x3f8",
    ]


# -- power-on reset --------------------------------------------------------------------------------------


def _dirty(name: str, machine: Machine) -> None:
    # Scribble on every port with values that change state, then reset.
    scenario = SCENARIOS[name]
    for port, sizes in scenario.ports:
        for value in (*scenario.values.get(port, ()), 0xFF, 0x5A):
            access(machine.router, port, sizes[-1], True, value)
    machine.clock.now += 3.25


def reset_machine(name: str) -> Machine:
    machine = SCENARIOS[name].build(SAVED_AT)
    _dirty(name, machine)
    reset_devices(machine.router)
    return machine


def inb(machine: Machine, port: int) -> int:
    value = access(machine.router, port, 1, False)
    assert value is not None
    return value


def test_reset_uart() -> None:
    # PC16550D datasheet, Table IV "UART Reset Configuration" (master reset): IER 0, IIR 01h, FCR 0, LCR 0,
    # MCR 0, LSR 60h (THRE and TEMT), MSR bits 0-3 low, bits 4-7 the input signals.
    m = reset_machine("uart16550")
    assert [inb(m, 0x3F8 + offset) for offset in (1, 2, 3, 4, 5)] == [0x00, 0x01, 0x00, 0x00, 0x60]
    assert inb(m, 0x3FE) & 0x0F == 0
    assert not m.irqs.level(4)


def test_reset_pit() -> None:
    # Intel 8254 datasheet, "Operation": after power-up the mode, count and output are undefined; this model
    # (as QEMU) powers up in mode 3 with a count of 65536, binary, LSB then MSB. Read-back status (C2h/E2h).
    m = reset_machine("i8254")
    access(m.router, 0x43, 1, True, 0xE2)  # latch the status of counter 0
    status = inb(m, 0x40)
    assert status & 0x3F == 0x36  # RW 11b, mode 3, binary
    access(m.router, 0x43, 1, True, 0xE8)  # counter 2's status
    assert inb(m, 0x42) & 0x3F == 0x36
    assert inb(m, 0x61) & 0x0F == 0  # port 0x61 bits 0-3: gate 2 and speaker off


def test_reset_rtc() -> None:
    # MC146818A datasheet, "RESET": clears PIE, AIE, UIE and SQWE in register B and IRQF, PF, AF and UF in
    # register C; the time, the calendar and the RAM are not affected.
    m = SCENARIOS["mc146818"].build(SAVED_AT)
    access(m.router, 0x70, 1, True, 0x0B)
    access(m.router, 0x71, 1, True, 0x7E)  # PIE, AIE, UIE, SQWE, binary, 24-hour
    access(m.router, 0x70, 1, True, 0x40)
    access(m.router, 0x71, 1, True, 0x99)
    m.clock.now += 2
    reset_devices(m.router)
    access(m.router, 0x70, 1, True, 0x0B)
    assert inb(m, 0x71) == 0x06
    access(m.router, 0x70, 1, True, 0x0C)
    assert inb(m, 0x71) == 0
    access(m.router, 0x70, 1, True, 0x40)
    assert inb(m, 0x71) == 0x99
    access(m.router, 0x70, 1, True, 0x00)
    assert inb(m, 0x71) == 52  # 23:59:50 plus two seconds, binary now
    assert not m.irqs.level(8)


def test_reset_pic() -> None:
    # 8259A datasheet, "Initialization Command Words": ICW1 clears IMR and ISR, gives IR7 the lowest priority
    # and selects IRR for reads; Intel PIIX datasheet: ELCR1 and ELCR2 default to 00h.
    m = reset_machine("i8259-pair")
    assert [inb(m, port) for port in (0x21, 0xA1, 0x4D0, 0x4D1)] == [0, 0, 0, 0]
    access(m.router, 0x20, 1, True, 0x0B)  # read ISR
    assert inb(m, 0x20) == 0
    assert not m.irqs.level(0)


def test_reset_i8042() -> None:
    # Status: keyboard not inhibited (bit 4), last write a command (bit 3), nothing buffered; command byte 03h
    # (both interrupts on) as QEMU powers up; the keyboard answers its ID (AB 83h, IBM PS/2 keyboard spec).
    m = reset_machine("i8042")
    assert inb(m, 0x64) == 0x18
    access(m.router, 0x64, 1, True, 0x20)
    assert inb(m, 0x60) == 0x03
    access(m.router, 0x60, 1, True, 0xF2)
    assert [inb(m, 0x60) for _ in range(3)] == [0xFA, 0xAB, 0x83]


def test_reset_ata() -> None:
    # ATA/ATAPI-6, 9.1 "Power-on and hardware reset" and the signature: Status 50h (DRDY, DSC), Error 01h,
    # Sector Count 01h, LBA Low 01h, LBA Mid 00h, LBA High 00h, Device 00h.
    m = reset_machine("ata-channel")
    assert [inb(m, 0x1F0 + offset) for offset in (1, 2, 3, 4, 5, 6, 7)] == [0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x50]
    assert inb(m, 0x3F6) == 0x50
    assert not m.irqs.level(14)


def test_reset_pci() -> None:
    # PCI Local Bus Specification 3.0, 6.2.2: RST# clears the command register (so BARs decode nothing); the
    # Intel 82441FX datasheet gives the host bridge PCICMD 0006h and PCISTS 0280h; CONFIG_ADDRESS resets to 0.
    m = reset_machine("pci-host")
    assert access(m.router, 0xCF8, 4, False) == 0
    access(m.router, 0xCF8, 4, True, 0x8000_0004)
    assert access(m.router, 0xCFC, 4, False) == 0x0280_0006
    access(m.router, 0xCF8, 4, True, 0x8000_1810)  # 00:03.0 BAR0, an I/O BAR
    assert access(m.router, 0xCFC, 4, False) == 0x1
    access(m.router, 0xCF8, 4, True, 0x8000_1804)
    assert access(m.router, 0xCFC, 2, False) == 0


def test_reset_port92_and_debug_ports() -> None:
    # SMSC LPC47 datasheet, Port 92: reset state 24h (reserved bits 2 and 5 read one).
    assert inb(reset_machine("port92"), 0x92) == 0x24
    m = reset_machine("debug")
    assert inb(m, 0x80) == 0  # no POST code written since power-on
    assert inb(m, 0x402) == 0xE9
    exit_device = devices_of(m.router)["debug-exit@0x501"]
    assert exit_device.save() == {"value": None}


def test_pc_reset_returns_every_device_to_power_on() -> None:
    machine = SCENARIOS["pc"].build(SAVED_AT)
    power_on = save_devices(machine.router)
    _dirty("pc", machine)
    assert relative(save_devices(machine.router)) != relative(power_on)
    machine.parts["pc"].reset()
    after = save_devices(machine.router)["devices"]
    # The RTC keeps its battery-backed time and RAM, and the refresh toggle of port 0x61 runs on. IRQ 0 is high
    # at power-on (PIT OUT 0 in mode 3) and stays high through the reset, so the PIC's edge-triggered IRR
    # latches it only the first time: the input-dependent bits are compared apart.
    for name, entry in after.items():
        if name.startswith(("mc146818", "port61")):
            continue
        if name.startswith("i8254"):  # where the clock is within a PIT tick
            entry["state"].pop("tick_fraction"), power_on["devices"][name]["state"].pop("tick_fraction")
        if name.startswith("i8259"):
            for chip in ("master", "slave"):
                for state in (entry["state"][chip], power_on["devices"][name]["state"][chip]):
                    state.pop("irr"), state.pop("edge_armed")
        assert entry == power_on["devices"][name], name
    pic = machine.parts["pc"].pic
    assert pic.master.irr == pic.slave.irr == 0


# -- golden files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(GOLDEN))
def test_golden_state_file_restores(kind: str) -> None:
    path = GOLDEN_DIR / f"{kind}.json"
    document = load_state(path.read_text(), source=str(path))
    expected = document.pop("checks")
    scenario_name = GOLDEN[kind][0]
    scenario = SCENARIOS[scenario_name]
    machine = scenario.build(123.0)
    devices = devices_of(machine.router)
    assert document["format"] == FORMAT
    for name, entry in document["devices"].items():
        assert entry["kind"] == kind
        restore_device(devices[name], entry, name=name)
        if entry["version"] == devices[name].state_version:
            # The same version saves what it restored.
            assert devices[name].save() == entry["state"]
    ops = [tuple(check[:-1]) for check in expected]
    assert checks(machine, scenario, ops) == expected


def test_every_kind_has_a_golden_file() -> None:
    kinds = {device.state_kind for device in devices_of(SCENARIOS["pc"].build(SAVED_AT).router).values()}
    assert kinds <= {path.name.split(".")[0] for path in GOLDEN_DIR.glob("*.json")}


# -- bad input -------------------------------------------------------------------------------------------


@pytest.fixture
def pc() -> Machine:
    machine = SCENARIOS["pc"].build(SAVED_AT)
    _dirty("pc", machine)
    return machine


def fails(machine: Machine, document: object) -> StateError:
    """Restore ``document``; check that it fails with one line and that every device is as it was."""
    before = relative(save_devices(machine.router))
    with pytest.raises(StateError) as caught:
        restore_devices(machine.router, document)
    assert relative(save_devices(machine.router)) == before
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, DispatchError)
    return caught.value


def other_pc_document() -> dict[str, Any]:
    other = SCENARIOS["pc"].build(SAVED_AT)
    for port, value in ((0x21, 0x5A), (0x3FF, 0x77), (0x92, 0x02), (0x80, 0x42)):
        access(other.router, port, 1, True, value)
    return save_devices(other.router)


def test_state_of_another_device_names_device_and_kind(pc: Machine) -> None:
    document = other_pc_document()
    devices = document["devices"]
    devices["i8254@0x40"] = devices["uart16550@0x3f8"]
    error = fails(pc, document)
    assert (error.device, error.field) == ("i8254@0x40", "kind")
    assert "'uart16550'" in str(error) and "'i8254'" in str(error)


def test_a_whole_file_of_another_device(pc: Machine) -> None:
    golden = load_state((GOLDEN_DIR / "uart16550.json").read_text(), source="uart16550.json")
    del golden["checks"]
    error = fails(pc, golden)
    assert error.field == "devices"


def test_newer_version_names_device_and_version(pc: Machine) -> None:
    document = other_pc_document()
    document["devices"]["mc146818@0x70"]["version"] = 2
    error = fails(pc, document)
    assert (error.device, error.field) == ("mc146818@0x70", "version")
    assert "newer" in str(error)


def test_truncated_file_names_file_line_and_column() -> None:
    text = dump_state(other_pc_document())
    with pytest.raises(StateError) as caught:
        load_state(text[: len(text) // 2], source="vm.state")
    assert caught.value.device == "vm.state"
    assert caught.value.field.startswith("line ")
    assert "truncated or corrupted" in str(caught.value)


def test_corrupted_bytes_name_the_file() -> None:
    text = dump_state(other_pc_document()).encode()
    with pytest.raises(StateError) as caught:
        load_state(text[:100] + b"\xff\xfe" + text[100:], source="vm.state")
    assert caught.value.device == "vm.state"
    with pytest.raises(StateError, match="NaN"):
        load_state('{"format": NaN}', source="vm.state")


@pytest.mark.parametrize(
    ("device", "path", "value", "field"),
    [
        ("uart16550@0x3f8", ["ier"], "x", "ier"),
        ("uart16550@0x3f8", ["rx"], list(range(17)), "rx"),
        ("i8254@0x40", ["channels", 1, "mode"], 9, "channels[1].mode"),
        ("i8254@0x40", ["channels"], [], "channels"),
        ("mc146818@0x70", ["cmos"], "00ff", "cmos"),
        ("mc146818@0x70", ["phase"], 1.5, "phase"),
        ("i8259-pair@0x20", ["slave", "elcr"], 0x01, "slave.elcr"),
        ("i8042@0x60", ["keyboard", "awaiting"], 0x12, "keyboard.awaiting"),
        ("i8042@0x60", ["buffer"], [300, False], "buffer"),
        ("ata-channel@0x1f0", ["drives", 0, "sectors"], 63, "drives[0].sectors"),
        ("ata-channel@0x1f0", ["drives", 1], {"status": 0}, "drives[1]"),
        ("pci-host@0xcf8", ["functions", "00:00.0", "config"], "86" * 256, "functions.00:00.0.config"),
        ("pci-host@0xcf8", ["functions", "00:07.0"], {"config": ""}, "functions.00:07.0"),
        ("port92@0x92", ["bits"], True, "bits"),
        ("post-codes@0x80", ["codes", 0], 256, "codes[0]"),
        ("debug-exit@0x501", ["value"], -1, "value"),
        ("pci-host@0xcf8", [], [], "state"),
    ],
)
def test_corrupted_field_names_device_and_field(
    pc: Machine, device: str, path: list[Any], value: object, field: str
) -> None:
    document = other_pc_document()
    # Corrupt the last device too: the devices restored before the bad one must be rolled back.
    target: Any = document["devices"][device]
    if not path:
        target["state"] = value
    else:
        target = target["state"]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    error = fails(pc, json.loads(json.dumps(document)))
    assert (error.device, error.field) == (device, field)


def test_a_failure_in_the_last_device_rolls_back_the_others(pc: Machine) -> None:
    document = other_pc_document()
    assert list(document["devices"])[-1] == "pci-host@0xcf8"
    document["devices"]["pci-host@0xcf8"]["state"]["address"] = 3
    error = fails(pc, document)
    assert (error.device, error.field) == ("pci-host@0xcf8", "address")


@pytest.mark.parametrize(
    ("change", "device", "field"),
    [
        (lambda d: d.update(format="something else"), "state document", "format"),
        (lambda d: d.update(format_version=2), "state document", "format_version"),
        (lambda d: d.pop("devices"), "state document", "devices"),
        (lambda d: d["devices"].pop("i8042@0x60"), "i8042@0x60", "devices"),
        (lambda d: d["devices"].update({"uart16550@0x2f8": d["devices"]["uart16550@0x3f8"]}), "uart16550@0x2f8",
         "devices"),
        (lambda d: d["devices"]["port92@0x92"].pop("state"), "port92@0x92", "state"),
        (lambda d: d["devices"]["port92@0x92"].update(version="1"), "port92@0x92", "version"),
    ],
)  # fmt: skip
def test_bad_envelope(pc: Machine, change: Any, device: str, field: str) -> None:
    document = other_pc_document()
    change(document)
    error = fails(pc, document)
    assert (error.device, error.field) == (device, field)


def test_not_a_document(pc: Machine) -> None:
    assert fails(pc, [1, 2]).field == "state"
    with pytest.raises(StateError, match="not a state document"):
        load_state("[1, 2]", source="x.json")


# -- the API itself --------------------------------------------------------------------------------------


class Counter:
    """A device whose state changed shape: version 1 kept ``count``; version 2 keeps ``counts`` per port."""

    state_kind = "counter"
    state_version = 2
    oldest_state_version = 1
    io_base = 0x300

    def __init__(self) -> None:
        self.counts = [0, 0]

    def reset(self) -> None:
        self.counts = [0, 0]

    def save(self) -> dict[str, Any]:
        return {"counts": list(self.counts)}

    def restore(self, state: Mapping[str, Any], version: int) -> None:
        f = StateFields(f"counter@{self.io_base:#x}", state)
        if version == 1:
            # The converter: version 1 counted both ports together, as port 0's.
            state = {"counts": [f.integer("count", 0, 1 << 32), 0]}
            f = StateFields(f"counter@{self.io_base:#x}", state)
        counts = f.ints("counts", 0, 1 << 32, max_length=2)
        if len(counts) != 2:
            raise f.error("counts", f"has {len(counts)} entries, not 2")
        self.counts = counts

    @on_port(0, 2)
    def port(self, access: PortAccess) -> int | None:
        if access.is_write:
            self.counts[access.offset] += 1
            return None
        return self.counts[access.offset]


class Broken(Counter):
    """A device whose restore fails with an error of its own: reported as a StateError, one line."""

    state_kind = "broken"
    io_base = 0x310

    def restore(self, state: Mapping[str, Any], version: int) -> None:
        raise KeyError("oops")


def test_converter_restores_an_older_version() -> None:
    router = Router()
    counter = Counter()
    router.include(counter)
    restore_devices(
        router, {"format": FORMAT, "format_version": 1, "devices": {"counter@0x300": {"kind": "counter", "version": 1,
                                                                                     "state": {"count": 5}}}}
    )  # fmt: skip
    assert counter.counts == [5, 0]


def test_unexpected_failure_is_a_state_error_and_rolls_back() -> None:
    router = Router()
    counter, broken = Counter(), Broken()
    router.include(counter)
    router.include(broken)
    document = save_devices(router)
    document["devices"]["counter@0x300"]["state"]["counts"] = [7, 7]
    with pytest.raises(StateError) as caught:
        restore_devices(router, document)
    assert (caught.value.device, caught.value.field) == ("broken@0x310", "state")
    assert counter.counts == [0, 0]


def test_plain_handlers_need_nothing() -> None:
    router = Router()

    @router.claim(0x500)
    def plain(access: PortAccess) -> int:
        return 1

    assert devices_of(router) == {}
    assert save_devices(router)["devices"] == {}
    restore_devices(router, save_devices(router))
    assert not is_stateful(plain)


def test_two_devices_of_one_kind_sharing_a_port_get_distinct_ids() -> None:
    class ReadCounter(Counter):
        @on_port(0, 2, access="r")
        def port(self, access: PortAccess) -> int | None:
            return self.counts[access.offset]

    class WriteCounter(Counter):
        @on_port(0, 2, access="w")
        def port(self, access: PortAccess) -> int | None:
            return None

    router = Router()
    router.include(ReadCounter())
    router.include(WriteCounter())
    assert list(devices_of(router)) == ["counter@0x300", "counter@0x300#2"]


def test_dump_state_refuses_what_json_cannot_carry() -> None:
    with pytest.raises(StateError, match="JSON"):
        dump_state({"devices": {"x": {"state": {"data": b"\x00"}}}})
    with pytest.raises(StateError, match="JSON"):
        dump_state({"devices": {"x": {"state": {"f": float("nan")}}}})


def test_dump_is_plain_json_a_person_can_read() -> None:
    text = dump_state(save_devices(SCENARIOS["pc"].build(SAVED_AT).router))
    assert text.splitlines()[1] == f' "format": "{FORMAT}",'
    assert json.loads(text)["devices"]["uart16550@0x3f8"]["state"]["ier"] == 0
