"""Tiny x86 test guests (nasm sources with their assembled flat binaries).

Every guest is a flat binary loaded at guest-physical ``LOAD_ADDRESS``
(0x7C00) and entered in real mode at CS:IP = 0000:7C00, like a boot sector;
``transports.kvm.boot.boot_flat_image`` does exactly that. Guests that need
protected or long mode switch to it themselves. Each ``.asm`` file documents
the ports it uses at its top.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from importlib import resources
from typing import Final

__all__ = [
    "ECHO_PORT",
    "EXIT_PASS",
    "EXIT_PORT",
    "GUESTS",
    "IN_LOOP_PORT",
    "LOAD_ADDRESS",
    "NOWHERE_PORT",
    "OUT_LOOP_COUNT_OFFSET",
    "ROM_CHECK_ADDRESS",
    "ROM_CHECK_IMAGE",
    "SMP_DONE_PORT",
    "SMP_TICKET_PORT",
    "GuestInfo",
    "guest_bytes",
    "guest_source",
    "in_loop_image",
    "mbr_checksum",
    "mbr_checksum_image",
    "out_loop_image",
    "smp_tickets_image",
]

LOAD_ADDRESS: Final = 0x7C00
EXIT_PORT: Final = 0x501  # isa-debug-exit: the guest writes its status byte, then halts
EXIT_PASS: Final = 0x00
ECHO_PORT: Final = 0xE0  # 4-byte echo latch at 0xE0-0xE3 (QEMU pc-testdev compatible)
NOWHERE_PORT: Final = 0xEC  # no device: the io_* guests expect all-ones reads
UART_BASE: Final = 0x3F8
OUT_LOOP_COUNT_OFFSET: Final = 4  # u32 N inside out_loop.bin (and in_loop.bin, smp_tickets.bin)
IN_LOOP_PORT: Final = 0xE4  # in_loop reads this port (8-bit) N times
SMP_TICKET_PORT: Final = 0x520  # smp_tickets: take a ticket (IN, 32-bit) at +0, give it back (OUT, 32-bit) at +4
SMP_DONE_PORT: Final = 0x528  # smp_tickets: each vCPU's status (OUT, 8-bit) when done
ROM_CHECK_ADDRESS: Final = 0xF0000
ROM_CHECK_IMAGE: Final = bytes([0xB3, 0x42, 0xCB]).ljust(0x10, b"\x00") + b"\xaa"  # what rom_check.asm expects


@dataclass(frozen=True, slots=True)
class GuestInfo:
    """What a guest is and how a test knows it succeeded."""

    name: str
    mode: str  # the CPU mode its interesting code runs in
    description: str
    checks: int = 0  # checks run by a self-checking guest (its final echo-latch value)


GUESTS: Final[dict[str, GuestInfo]] = {
    info.name: info
    for info in (
        GuestInfo(
            "hello_real",
            "real",
            "prints 'Hello from the guest\\n' on a 16550 at 0x3F8, loops 'Loop' back, exits with 0 on match",
        ),
        GuestInfo("io_prot32", "protected32", "IN/OUT/INS/OUTS self-checks in 32-bit protected mode", checks=21),
        GuestInfo("io_long64", "long64", "IN/OUT/INS/OUTS self-checks in 64-bit long mode", checks=22),
        GuestInfo("out_loop", "protected32", "out 0x80, al N times (N at image offset 4), then exit 0"),
        GuestInfo(
            "in_loop",
            "protected32",
            "in al, dx (port 0xE4) N times (N at image offset 4), the sum of the bytes to 0xE0, then exit 0",
        ),
        GuestInfo(
            "smp_tickets",
            "protected32",
            "on every vCPU: N tickets taken (IN 0x520) and given back (OUT 0x524), status to 0x528, cli; hlt",
        ),
        GuestInfo("io_probe", "all", "I/O cases in real, 32-bit and 64-bit mode for transports.kvm.probe"),
        GuestInfo("rom_check", "real", "far-calls code in a ROM slot at 0xF0000 and tries to overwrite a ROM byte"),
        GuestInfo("irq_real", "real", "takes vector 0x20 injected with KVM_INTERRUPT, reports it on port 0xE0"),
        GuestInfo("triple_fault", "protected32", "ud2 with an empty IDT in protected mode: a triple fault"),
        GuestInfo("rep_ins", "real", "REP INS cases (DF, page crossings, chunks, segment base) from port 0xE8"),
        GuestInfo(
            "mbr_checksum",
            "real",
            "boot sector: reads sectors from LBA 1 with INT 13h, prints their checksum on COM1, exits 0",
        ),
    )
}


def guest_bytes(name: str) -> bytes:
    """The committed flat binary of guest ``name``."""
    if name not in GUESTS:
        raise KeyError(f"unknown guest {name!r}; known: {', '.join(sorted(GUESTS))}")
    return resources.files(__name__).joinpath(f"{name}.bin").read_bytes()


def guest_source(name: str) -> str:
    """The nasm source of guest ``name``."""
    if name not in GUESTS:
        raise KeyError(f"unknown guest {name!r}; known: {', '.join(sorted(GUESTS))}")
    return resources.files(__name__).joinpath(f"{name}.asm").read_text()


def _counted(name: str, count: int) -> bytes:
    if not 1 <= count < 2**32:
        raise ValueError(f"count {count} out of range 1..2**32-1")
    image = bytearray(guest_bytes(name))
    struct.pack_into("<I", image, OUT_LOOP_COUNT_OFFSET, count)
    return bytes(image)


def out_loop_image(count: int) -> bytes:
    """``out_loop`` patched to execute ``count`` OUTs (1 <= count < 2**32)."""
    return _counted("out_loop", count)


def in_loop_image(count: int) -> bytes:
    """``in_loop`` patched to execute ``count`` INs (1 <= count < 2**32)."""
    return _counted("in_loop", count)


def smp_tickets_image(count: int) -> bytes:
    """``smp_tickets`` patched so that every vCPU takes and gives back ``count`` tickets (1 <= count < 2**32)."""
    return _counted("smp_tickets", count)


MBR_CHUNK_OFFSET: Final = 0x1B4  # u16 sectors per INT 13h call in mbr_checksum.bin
MBR_SECTORS_OFFSET: Final = 0x1B6  # u16 sectors read in all


def mbr_checksum_image(sectors: int = 64, chunk: int = 8) -> bytes:
    """``mbr_checksum`` patched to read ``sectors`` sectors from LBA 1, ``chunk`` per INT 13h call."""
    if not 1 <= sectors <= 1024 or not 1 <= chunk <= 127:
        raise ValueError(f"sectors {sectors} must be 1..1024 and chunk {chunk} 1..127")
    image = bytearray(guest_bytes("mbr_checksum"))
    struct.pack_into("<HH", image, MBR_CHUNK_OFFSET, chunk, sectors)
    return bytes(image)


def mbr_checksum(data: bytes) -> int:
    """What ``mbr_checksum`` prints for these bytes: sum = rol32(sum, 5) + byte, over every byte."""
    total = 0
    for byte in data:
        total = (((total << 5) | (total >> 27)) + byte) & 0xFFFF_FFFF
    return total
