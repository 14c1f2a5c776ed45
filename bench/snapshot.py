"""Snapshots: a PC written to a file and read back, beside a plain write and read of as many bytes.

- ``snapshot_ratio`` (target >= 0.5): the example PC's VM (64 MiB of RAM
  holding data, the BIOS ROM and its shadow, one vCPU, every device) saved
  with :func:`transports.kvm.snapshot.save_snapshot`, then opened and
  restored into a second VM of the same shape (memory, the vCPU, the
  devices); against ``write()`` of a buffer of the
  snapshot file's size to a file in the same directory and ``readinto()``
  back. The restore reads memory without checking it against the CRC-32s
  written with it (the default, as in other VMMs); ``snapshot_verified_ratio``
  is the same with the check (``--verify``). Both run in the same temporary directory, one after the other, in
  pairs; the ratio is the median of baseline time over snapshot time. The
  files stay in the page cache: this measures the snapshot's own cost
  (capture, CRCs, the header, copying), not the disk.
- ``save_restore_pc_us``: the PC's device states alone
  (:func:`dispatcher.device_state.save_devices` then
  :func:`~dispatcher.device_state.restore_devices`), median microseconds.

Needs KVM for the ratio (skipped otherwise); SeaBIOS is used as the BIOS
image when installed, else 256 KiB of zeros of the same shape.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from dispatcher import IrqLine, dump_state, restore_devices, save_devices
from examples.pc_devices import build_pc
from examples.pc_kvm import PcConfig, build_vm
from transports.kvm import kvm_available
from transports.kvm.snapshot import Snapshot, save_snapshot

SEABIOS = Path("/usr/share/seabios/bios.bin")
MiB = 1 << 20
MEMORY = 64 * MiB


def _bios() -> bytes:
    return SEABIOS.read_bytes() if SEABIOS.exists() else bytes(256 * 1024)


def _device_round(quick: bool) -> dict[str, float]:
    pc = build_pc(memory_size=MEMORY, intr=IrqLine(name="INTR"))
    document = save_devices(pc.router)
    times = []
    for _ in range(200 if quick else 2000):
        start = time.perf_counter()
        restore_devices(pc.router, save_devices(pc.router))
        times.append(time.perf_counter() - start)
    micros = statistics.median(times) * 1e6
    size = len(dump_state(document))
    print(f"  the PC's device states: save + restore {micros:8.1f} us  ({len(document['devices'])} devices, "
          f"{size} bytes of JSON)")  # fmt: skip
    return {"save_restore_pc_us": micros, "pc_device_state_bytes": float(size)}


def _snapshot_once(path: Path, source: object, target: object, pc: object, *, verify: bool = False) -> float:
    from examples.pc_devices import PC
    from transports.kvm import Vm

    assert isinstance(source, Vm) and isinstance(target, Vm) and isinstance(pc, PC)
    start = time.perf_counter()
    save_snapshot(path, source, machine={"kind": "bench"}, devices=save_devices(pc.router))
    snapshot = Snapshot.open(path)
    snapshot.load_memory(target, verify=verify)
    snapshot.restore_cpus(target)
    assert snapshot.devices is not None
    restore_devices(pc.router, snapshot.devices)
    return time.perf_counter() - start


def _plain_once(path: Path, data: bytes, buffer: bytearray) -> float:
    start = time.perf_counter()
    with open(path, "wb") as file:
        file.write(data)
    with open(path, "rb") as file:
        file.readinto(buffer)
    return time.perf_counter() - start


def run(quick: bool) -> dict[str, float]:
    figures = _device_round(quick)
    reason = kvm_available()
    if reason is not None:
        print(f"  KVM not usable here ({reason}): snapshot_ratio skipped")
        return figures
    config = PcConfig(bios=_bios(), memory_size=MEMORY)
    source, target = build_vm(config), build_vm(config)
    pc = build_pc(memory_size=MEMORY, intr=IrqLine(name="INTR"))
    rounds = 5 if quick else 15
    with source, target, tempfile.TemporaryDirectory(prefix="bench-snapshot-") as folder:
        ram = source.regions[0]
        ram.mem[:] = os.urandom(MiB) * (ram.size // MiB)  # RAM that holds something, as a booted guest's does
        snapshot_path, plain_path = Path(folder) / "pc.snap", Path(folder) / "plain.bin"
        _snapshot_once(snapshot_path, source, target, pc)  # warm up: the MSR list, the page cache
        size = snapshot_path.stat().st_size
        data, buffer = os.urandom(MiB) * (size // MiB) + bytes(size % MiB), bytearray(size)
        _plain_once(plain_path, data, buffer)
        runs = []
        for _ in range(rounds):
            plain = _plain_once(plain_path, data, buffer)
            snapshot = _snapshot_once(snapshot_path, source, target, pc)
            verified = _snapshot_once(snapshot_path, source, target, pc, verify=True)
            runs.append((plain, snapshot, verified))
    ratio = statistics.median(plain / snapshot for plain, snapshot, _ in runs)
    verified_ratio = statistics.median(plain / verified for plain, _, verified in runs)
    snapshot_ms = statistics.median(run[1] for run in runs) * 1e3
    verified_ms = statistics.median(run[2] for run in runs) * 1e3
    plain_ms = statistics.median(run[0] for run in runs) * 1e3
    print(f"  PC snapshot ({MEMORY // MiB} MiB of RAM, {size / MiB:.1f} MiB file), write + read back + restore: "
          f"{snapshot_ms:7.1f} ms")  # fmt: skip
    print(f"  the same, memory checked against its CRC-32s as it is read (--verify):     {verified_ms:7.1f} ms")
    print(f"  plain write + read of as many bytes, same directory:                      {plain_ms:7.1f} ms")
    print(f"  snapshot_ratio {ratio:.2f} (median over {rounds} rounds of plain / snapshot; target >= 0.5); "
          f"verified {verified_ratio:.2f}")  # fmt: skip
    figures.update(
        snapshot_ratio=ratio,
        snapshot_verified_ratio=verified_ratio,
        snapshot_ms=snapshot_ms,
        snapshot_verified_ms=verified_ms,
        snapshot_plain_ms=plain_ms,
        snapshot_bytes=float(size),
    )
    return figures
