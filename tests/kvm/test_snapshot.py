"""Snapshots on KVM: a running machine written to one file and resumed in another process.

A flat guest counting OUTs resumes where it stopped (not one OUT lost or
repeated); ``python -m examples.pc --snapshot-on TEXT FILE`` stops SeaBIOS
after its banner and ``--restore FILE`` resumes it in a new process, which
reaches "No bootable device", or boots the MBR and prints the checksum the
host computes. Damaged files give typed errors that say where.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from kvm_support import requires_kvm
from service_process import ServiceProcess

from examples.guests import mbr_checksum, mbr_checksum_image, out_loop_image
from examples.pc_remote_vmm import run_remote_pc
from transports.kvm import IoExit, Vm, boot_flat_image
from transports.kvm.snapshot import (
    MAGIC,
    PREFIX,
    CorruptSnapshotError,
    IncompatibleSnapshotError,
    Snapshot,
    SnapshotError,
    TruncatedSnapshotError,
    restore_vm,
    save_snapshot,
)

pytestmark = [requires_kvm]

SEABIOS = Path("/usr/share/seabios/bios.bin")
requires_seabios = pytest.mark.skipif(not SEABIOS.exists(), reason=f"{SEABIOS} is missing (apt-get install seabios)")
BOOT_TIMEOUT = 240  # seconds: SeaBIOS needs ~4 s here when the machine is idle, minutes when it is not
BANNER = "SeaBIOS (version"
LOOPS, BEFORE = 1000, 300
RAM = 1 << 20


def flat_snapshot(path: Path) -> dict[str, object]:
    """out_loop set to 1000 OUTs, stopped after 300 of them and saved to ``path``; returns the header."""
    vm, vcpu = boot_flat_image(out_loop_image(LOOPS), ram_size=RAM)
    with vm:
        outs = 0
        while outs < BEFORE:
            exit = vcpu.run()
            assert isinstance(exit, IoExit), exit
            outs += exit.port == 0x80
        return save_snapshot(path, vm, machine={"kind": "test.flat"})


RESUME = textwrap.dedent(
    """
    import sys
    from transports.kvm import IoExit, Vm
    from transports.kvm.snapshot import Snapshot
    snapshot = Snapshot.open(sys.argv[1])
    vm = Vm()
    vm.add_ram(0, snapshot.region("ram").size, name="ram")
    vcpu = vm.create_vcpu()
    snapshot.load_memory(vm, verify=True)
    snapshot.restore_cpus(vm)
    outs = 0
    while True:
        exit = vcpu.run()
        if not isinstance(exit, IoExit):
            print("stopped:", exit)
            break
        if exit.port == 0x501:
            print("OUTs after the restore:", outs)
            break
        outs += exit.port == 0x80
    """
)


def test_a_flat_guest_resumes_in_another_process_without_losing_or_repeating_an_out(tmp_path: Path) -> None:
    path = tmp_path / "flat.snap"
    flat_snapshot(path)
    result = subprocess.run([sys.executable, "-c", RESUME, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"OUTs after the restore: {LOOPS - BEFORE}"


def test_the_header_describes_the_cpu_and_the_memory(tmp_path: Path) -> None:
    path = tmp_path / "flat.snap"
    header = flat_snapshot(path)
    snapshot = Snapshot.open(path)
    assert snapshot.header == json.loads(json.dumps(header))
    assert snapshot.machine == {"kind": "test.flat"}
    assert snapshot.devices is None
    (ram,) = snapshot.regions
    assert (ram.name, ram.guest_phys_addr, ram.size, ram.readonly) == ("ram", 0, RAM, False)
    assert ram.offset % 4096 == 0 and path.stat().st_size == ram.offset + RAM
    vcpu = snapshot.header["cpu"]["vcpus"][0]
    assert vcpu["sregs"]["cr0"] & 1  # out_loop runs in protected mode
    assert 0x10 in {index for index, _ in vcpu["msrs"]}  # IA32_TSC
    assert {"regs", "sregs", "msrs", "events", "debugregs", "mp_state", "cpuid"} <= set(vcpu)
    assert "xsave" in vcpu or "fpu" in vcpu


# -- damaged and mismatched files ---------------------------------------------------------------


@pytest.fixture
def snapshot_file(tmp_path: Path) -> Path:
    path = tmp_path / "flat.snap"
    flat_snapshot(path)
    return path


def test_a_truncated_file_names_the_slot_and_where_the_file_ends(snapshot_file: Path) -> None:
    size = snapshot_file.stat().st_size
    with snapshot_file.open("r+b") as file:
        file.truncate(size - 100)
    with pytest.raises(TruncatedSnapshotError) as caught:
        Snapshot.open(snapshot_file)
    assert caught.value.offset == size - 100 and caught.value.field == "regions[0]"
    assert "'ram'" in str(caught.value) and str(snapshot_file) in str(caught.value)


def test_a_file_cut_inside_the_header_is_truncated(snapshot_file: Path) -> None:
    snapshot_file.write_bytes(snapshot_file.read_bytes()[: PREFIX.size + 10])
    with pytest.raises(TruncatedSnapshotError) as caught:
        Snapshot.open(snapshot_file)
    assert caught.value.field == "header" and caught.value.offset == PREFIX.size + 10


def test_a_changed_byte_of_memory_fails_its_crc(snapshot_file: Path) -> None:
    snapshot = Snapshot.open(snapshot_file)
    offset = snapshot.regions[0].offset + 0x7C10
    data = bytearray(snapshot_file.read_bytes())
    data[offset] ^= 0x40
    snapshot_file.write_bytes(bytes(data))
    vm = Vm()
    with vm:
        vm.add_ram(0, RAM, name="ram")
        with pytest.raises(CorruptSnapshotError) as caught:
            Snapshot.open(snapshot_file).load_memory(vm, verify=True)
    assert caught.value.field == "regions[0].crc32" and caught.value.offset == snapshot.regions[0].offset


def test_a_changed_header_byte_fails_the_header_crc(snapshot_file: Path) -> None:
    data = bytearray(snapshot_file.read_bytes())
    data[PREFIX.size + 5] ^= 0x01
    snapshot_file.write_bytes(bytes(data))
    with pytest.raises(CorruptSnapshotError) as caught:
        Snapshot.open(snapshot_file)
    assert caught.value.field == "header" and caught.value.offset == PREFIX.size and "CRC-32" in str(caught.value)


def test_another_file_and_another_version_are_refused_at_the_prefix(snapshot_file: Path) -> None:
    data = bytearray(snapshot_file.read_bytes())
    snapshot_file.write_bytes(b"PK\x03\x04" + bytes(data[4:]))
    with pytest.raises(CorruptSnapshotError, match="not a snapshot file") as bad_magic:
        Snapshot.open(snapshot_file)
    assert bad_magic.value.field == "magic" and bad_magic.value.offset == 0
    struct.pack_into("<8sI", data, 0, MAGIC, 2)
    snapshot_file.write_bytes(bytes(data))
    with pytest.raises(IncompatibleSnapshotError, match="format version 2") as newer:
        Snapshot.open(snapshot_file)
    assert newer.value.field == "format_version"


def test_a_bad_register_value_is_named_and_nothing_is_set(snapshot_file: Path) -> None:
    cpu = json.loads(json.dumps(Snapshot.open(snapshot_file).header["cpu"]))
    cpu["vcpus"][0]["regs"]["rip"] = -1
    vm = Vm()
    with vm:
        vm.add_ram(0, RAM, name="ram")
        vcpu = vm.create_vcpu()
        before = bytes(vcpu.get_regs())
        with pytest.raises(CorruptSnapshotError) as caught:
            restore_vm(vm, cpu)
        assert bytes(vcpu.get_regs()) == before
    assert caught.value.field == "cpu.vcpus[0].regs.rip"


def test_a_vm_with_other_memory_is_refused(snapshot_file: Path) -> None:
    vm = Vm()
    with vm:
        vm.add_ram(0, 2 * RAM, name="ram")
        with pytest.raises(IncompatibleSnapshotError) as caught:
            Snapshot.open(snapshot_file).load_memory(vm)
    assert caught.value.field == "regions[0]" and "0x100000" in str(caught.value)


def test_every_snapshot_error_is_a_dispatch_error() -> None:
    from dispatcher import DispatchError

    assert issubclass(SnapshotError, DispatchError)
    for kind in (TruncatedSnapshotError, CorruptSnapshotError, IncompatibleSnapshotError):
        assert issubclass(kind, SnapshotError)


# -- the PC on the command line -----------------------------------------------------------------


def pc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examples.pc", "--timeout", str(BOOT_TIMEOUT), *args],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60,
    )  # fmt: skip


def snapshot_pc(path: Path, *args: str) -> str:
    """Boot SeaBIOS, snapshot it after its banner; what it printed."""
    result = pc("--bios", str(SEABIOS), "--snapshot-on", BANNER, str(path), *args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert BANNER in result.stdout and f"wrote a snapshot to {path}" in result.stderr
    assert "No bootable device" not in result.stdout and "Booting from" not in result.stdout
    return result.stdout


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, int]:
    """An MBR that checksums 64 sectors, then 64 sectors of random data; and the checksum the host computes."""
    data = random.Random(7).randbytes(64 * 512)
    image = tmp_path / "disk.img"
    image.write_bytes(mbr_checksum_image(64) + data + bytes(512 * 64))
    return image, mbr_checksum(data)


@requires_seabios
def test_seabios_snapshotted_after_its_banner_resumes_to_no_bootable_device(tmp_path: Path) -> None:
    path = tmp_path / "seabios.snap"
    before = snapshot_pc(path)
    result = pc("--restore", str(path), "--until", "No bootable device")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "No bootable device" in result.stdout
    # Where the first run stopped, the second goes on: together they print what one boot prints there, not a
    # character lost or repeated. (Only there: later lines may differ with the machine's load, such as a
    # timeout warning. The first run ends its last line for the terminal: that newline may not be the guest's.)
    full = pc("--bios", str(SEABIOS), "--until", "No bootable device").stdout
    joins = [head for head in (before, before.removesuffix("\n")) if full.startswith(head)]
    assert any(full[len(head) : len(head) + 200] == result.stdout[:200] for head in joins), (before, result.stdout)


@requires_seabios
def test_an_mbr_boot_snapshotted_after_the_banner_resumes_and_prints_the_checksum(
    tmp_path: Path, disk: tuple[Path, int]
) -> None:
    image, expected = disk
    path = tmp_path / "mbr.snap"
    snapshot_pc(path, "--disk", str(image))
    result = pc("--restore", str(path), "--disk", str(image))
    assert f"MBR checksum {expected:08X}\n" in result.stdout, result.stdout[-2000:] + result.stderr
    assert not result.stdout.startswith(BANNER) and "Booting from Hard Disk" in result.stdout  # resumed, not rebooted
    assert result.returncode == 1  # isa-debug-exit: (0 << 1) | 1, the MBR's "success"


@requires_seabios
def test_restoring_needs_the_disk_the_snapshot_had_and_a_sound_file(tmp_path: Path, disk: tuple[Path, int]) -> None:
    image, _ = disk
    path = tmp_path / "mbr.snap"
    snapshot_pc(path, "--disk", str(image))
    result = pc("--restore", str(path))
    assert result.returncode == 2 and "was taken with a disk: give --disk PATH" in result.stderr
    data = bytearray(path.read_bytes())
    data[Snapshot.open(path).region("ram").offset + 0x1000] ^= 0xFF
    path.write_bytes(bytes(data))
    result = pc("--restore", str(path), "--disk", str(image), "--verify")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()  # one line, no traceback
    assert "regions[0].crc32" in line and str(path) in line


def test_the_options_are_checked_before_anything_runs(tmp_path: Path) -> None:
    for args, message in [
        ((), "give --bios PATH to boot a PC, or --restore FILE"),
        (("--bios", "b", "--restore", "f"), "give --bios PATH to boot a PC, or --restore FILE"),
        (("--restore", "f", "--memory", "8"), "--memory is the snapshot's"),
        (("--bios", "b", "--verify"), "give --restore FILE"),
        (("--bios", "b", "--snapshot-on", "X", "f", "--until", "Y"), "leave out --until"),
    ]:
        result = pc(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    result = pc("--restore", str(tmp_path / "missing.snap"))
    assert result.returncode == 2 and "cannot read the snapshot" in result.stderr


# -- the PC with its devices in a service: the service saves and restores them (SAVE, RESTORE) -----------

requires_remote_hooks = pytest.mark.skipif(
    not {"prepare", "finish"} <= set(inspect.signature(run_remote_pc).parameters),
    reason="examples.pc_remote_vmm.run_remote_pc takes no prepare/finish hooks",
)


def service(tmp_path: Path, name: str, disk: Path | None = None) -> ServiceProcess:
    """A fresh ``serve`` of the PC's devices: nothing of an earlier run's devices can be left in it."""
    env = dict(os.environ, PC_DISK=str(disk) if disk is not None else "")
    return ServiceProcess(
        tmp_path, "--device", "examples.pc_remote_devices:pc_devices", socket=tmp_path / f"{name}.sock", env=env,
        ready_timeout=60,
    )  # fmt: skip


@requires_seabios
@requires_remote_hooks
def test_seabios_with_its_devices_in_a_service_resumes_through_another_service(tmp_path: Path) -> None:
    path = tmp_path / "remote.snap"
    first = service(tmp_path, "first")
    try:
        before = pc("--bios", str(SEABIOS), "--backend", f"unix:{first.socket}", "--snapshot-on", BANNER, str(path))
    finally:
        first.stop()
    assert before.returncode == 0 and f"wrote a snapshot to {path}" in before.stderr, before.stderr
    devices = Snapshot.open(path).devices
    assert devices is not None and any(name.startswith("i8259") for name in devices["devices"])
    second = service(tmp_path, "second")
    try:
        result = pc("--restore", str(path), "--backend", f"unix:{second.socket}", "--until", "No bootable device")
        assert "device state restored" in second.log
    finally:
        second.stop()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert not result.stdout.startswith(BANNER) and "No bootable device" in result.stdout


@requires_seabios
@requires_remote_hooks
def test_an_mbr_boot_with_its_devices_in_a_service_resumes_and_prints_the_checksum(
    tmp_path: Path, disk: tuple[Path, int]
) -> None:
    image, expected = disk
    path = tmp_path / "remote-mbr.snap"
    first = service(tmp_path, "first", image)
    try:
        before = pc("--bios", str(SEABIOS), "--backend", f"unix:{first.socket}", "--snapshot-on", BANNER, str(path))
    finally:
        first.stop()
    assert before.returncode == 0, before.stderr
    second = service(tmp_path, "second", image)
    try:
        result = pc("--restore", str(path), "--backend", f"unix:{second.socket}")
    finally:
        second.stop()
    assert f"MBR checksum {expected:08X}\n" in result.stdout, result.stdout[-2000:] + result.stderr
    assert not result.stdout.startswith(BANNER) and result.returncode == 1


@requires_seabios
def test_a_snapshot_resumes_only_where_its_devices_ran(tmp_path: Path) -> None:
    path = tmp_path / "inproc.snap"
    snapshot_pc(path)
    result = pc("--restore", str(path), "--backend", f"unix:{tmp_path / 'none.sock'}")
    assert result.returncode == 2, result.stderr
    if {"prepare", "finish"} <= set(inspect.signature(run_remote_pc).parameters):
        assert "ran them in process (--backend inproc): resume it the same way" in result.stderr
    else:
        assert "need --backend inproc" in result.stderr
