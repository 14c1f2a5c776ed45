"""The committed guest binaries are exactly what their nasm sources assemble to."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from kvm_support import GUESTS_DIR, NASM, requires_nasm

from examples.guests import GUESTS, guest_bytes, guest_source, out_loop_image

SOURCES = sorted(p.stem for p in GUESTS_DIR.glob("*.asm") if (GUESTS_DIR / f"{p.stem}.bin").exists())


def test_every_registered_guest_has_source_and_binary() -> None:
    assert sorted(GUESTS) == SOURCES
    for name in GUESTS:
        assert guest_bytes(name)
        assert "Load/entry" in guest_source(name)


@requires_nasm
@pytest.mark.parametrize("name", SOURCES)
def test_nasm_reproduces_the_committed_binary(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.bin"
    # cwd = the guests directory so %include finds io_checks.inc.
    subprocess.run([str(NASM), "-f", "bin", "-o", str(out), f"{name}.asm"], cwd=GUESTS_DIR, check=True)
    assert out.read_bytes() == (GUESTS_DIR / f"{name}.bin").read_bytes()


def test_out_loop_count_is_patched() -> None:
    image = out_loop_image(12345)
    assert int.from_bytes(image[4:8], "little") == 12345
    assert image[8:] == guest_bytes("out_loop")[8:]
    with pytest.raises(ValueError):
        out_loop_image(0)
