"""Re-record the QEMU traces the differential tests replay (run by hand, not by the test suite).

    .venv/bin/python tests/qemu/record_qemu_traces.py [--qemu qemu-system-x86_64] [--bios /usr/share/seabios/bios.bin]

Each trace is QEMU (TCG, so that the PIC and PIT are QEMU's own devices and
show in the log) running the same SeaBIOS the example PC boots, with the
devices the example PC has: a pc machine without defaults, 128 MiB, COM1 to
a file, the debug console at 0x402, isa-debug-exit at 0x501, an IDE disk,
and a fixed RTC start (2024-01-01 00:00:00 UTC) that the replay gives the
example RTC too. QEMU logs ``memory_region_ops_read``/``_write`` and
``pic_interrupt`` with timestamps (``-msg timestamp=on``).

- ``seabios-blank-disk.log.gz``: SeaBIOS with a blank 1 MiB disk, stopped
  0.6 s after the debug console shows "No bootable device" (SeaBIOS then
  waits with the timer interrupt running: about ten ticks of IRQ 0);
- ``mbr-checksum.log.gz``: SeaBIOS boots ``mbr-disk.img.gz`` (the
  ``mbr_checksum`` guest reading 8 sectors of fixed data through INT 13h),
  which prints its checksum on COM1 and exits QEMU through isa-debug-exit.

The committed logs keep QEMU's format but only the lines
:func:`dispatcher.qemu_log.read_qemu_log` uses (port accesses of a CPU and
``pic_interrupt``), after a ``#`` line naming the QEMU that made them.
Re-recording changes every time stamp, so the replay's allowed differences
(``allow-*.toml``) may need a look afterwards.
"""

from __future__ import annotations

import argparse
import gzip
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from dispatcher.qemu_log import parse_qemu_log
from examples.guests import mbr_checksum_image

HERE = Path(__file__).resolve().parent
RTC_BASE = "2024-01-01T00:00:00"
MEMORY_MIB = 128
BLANK_DISK_SIZE = 1 << 20
MBR_SECTORS = 8
LINGER = 0.6  # seconds of SeaBIOS waiting after "No bootable device": about ten timer interrupts
TIME_LIMIT = 120.0  # seconds, for a loaded machine: SeaBIOS needs about 3 under TCG


def mbr_disk() -> bytes:
    """The MBR guest reading MBR_SECTORS sectors of fixed pseudo-random data, padded to 64 KiB."""
    data = random.Random(2024).randbytes(MBR_SECTORS * 512)
    return (mbr_checksum_image(MBR_SECTORS) + data).ljust(1 << 16, b"\0")


def run_qemu(qemu: str, bios: str, disk: Path, work: Path, stop_text: bytes, linger: float = 0.0) -> tuple[Path, bytes]:
    """Run QEMU until it exits or ``linger`` seconds after the debug console or COM1 shows ``stop_text``.

    Returns the log and COM1's bytes.
    """
    log, debugcon, serial = work / "qemu.log", work / "debugcon.txt", work / "serial.txt"
    command = [
        qemu, "-accel", "tcg", "-machine", "pc", "-cpu", "qemu64", "-m", str(MEMORY_MIB), "-nodefaults",
        "-vga", "none", "-display", "none", "-no-reboot", "-bios", bios,
        "-rtc", f"base={RTC_BASE},clock=vm",
        "-serial", f"file:{serial}", "-debugcon", f"file:{debugcon}", "-global", "isa-debugcon.iobase=0x402",
        "-device", "isa-debug-exit,iobase=0x501,iosize=2",
        "-drive", f"file={disk},format=raw,if=ide",
        "-msg", "timestamp=on", "-D", str(log),
        "-trace", "memory_region_ops_read", "-trace", "memory_region_ops_write", "-trace", "pic_interrupt",
    ]  # fmt: skip
    process = subprocess.Popen(command)
    deadline = time.monotonic() + TIME_LIMIT
    try:
        while process.poll() is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"QEMU did not show {stop_text!r} within {TIME_LIMIT} s")
            seen = b"".join(p.read_bytes() for p in (debugcon, serial) if p.exists())
            if stop_text in seen:
                time.sleep(linger)
                break
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait()
    return log, serial.read_bytes() if serial.exists() else b""


def keep_used_lines(log: Path, out: Path, header: str) -> int:
    """Gzip the lines the replay uses, in QEMU's format, after a comment ``header``; return how many."""
    lines = log.read_text().splitlines(keepends=True)
    used = {record.line for record in parse_qemu_log(lines, path=str(log))}
    # A line cut short when QEMU was stopped fails parsing above; so does anything unexpected.
    with gzip.open(out, "wt", compresslevel=9) as stream:
        stream.write(f"# {header}\n")
        stream.writelines(line for number, line in enumerate(lines, 1) if number in used)
    return len(used)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    parser.add_argument("--bios", default="/usr/share/seabios/bios.bin")
    args = parser.parse_args()
    qemu = shutil.which(args.qemu) or args.qemu
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        blank = work / "blank.img"
        blank.write_bytes(bytes(BLANK_DISK_SIZE))
        log, _ = run_qemu(qemu, args.bios, blank, work, b"No bootable device", LINGER)
        kept = keep_used_lines(log, HERE / "seabios-blank-disk.log.gz", f"{version}; SeaBIOS, blank 1 MiB disk")
        print(f"seabios-blank-disk.log.gz: {kept} lines")

        image = mbr_disk()
        (HERE / "mbr-disk.img.gz").write_bytes(gzip.compress(image, mtime=0))
        disk = work / "mbr.img"
        disk.write_bytes(image)
        for name in ("qemu.log", "debugcon.txt", "serial.txt"):
            (work / name).unlink(missing_ok=True)
        log, serial = run_qemu(qemu, args.bios, disk, work, b"\xff-never-\xff")
        if b"MBR checksum" not in serial:
            raise SystemExit(f"the MBR guest printed {serial!r}, not its checksum")
        kept = keep_used_lines(log, HERE / "mbr-checksum.log.gz", f"{version}; SeaBIOS, mbr-disk.img")
        print(f"mbr-checksum.log.gz: {kept} lines; COM1: {serial.decode(errors='replace').strip()}")


if __name__ == "__main__":
    main()
