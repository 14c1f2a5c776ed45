"""Write the golden state files, ``tests/devices/golden/<kind>.json``, one per example device kind.

    .venv/bin/python tests/devices/make_golden.py            # write the files of kinds that have none
    .venv/bin/python tests/devices/make_golden.py --force KIND ...   # rewrite those (see docs/DEVICE_STATE.md)

Each file is a state document (``dispatcher.dump_state``) holding one device, saved after the operations
``device_scenarios.GOLDEN`` lists, plus a ``"checks"`` list: operations run on a fresh device after the
restore, each with the value it read. ``test_device_state.py`` restores every file with the current code and
runs the same checks. A file is written once, by the version that introduces its state version, and kept:
when a device's state version changes, the old file stays (renamed ``<kind>.v<N>.json``) to prove the converter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from device_scenarios import GOLDEN, SCENARIOS, checks, only

from dispatcher import devices_of, dump_state, restore_device, save_devices

GOLDEN_DIR = Path(__file__).parent / "golden"
SAVED_AT, RESTORED_AT = 1000.0, 5000.5  # clock readings: the restore re-bases every time


def golden(kind: str) -> dict[str, Any]:
    """The golden document of ``kind`` with its checks."""
    scenario_name, before, after = GOLDEN[kind]
    scenario = SCENARIOS[scenario_name]
    machine = scenario.build(SAVED_AT)
    checks(machine, scenario, before)
    document = only(save_devices(machine.router), kind)
    fresh = scenario.build(RESTORED_AT)
    devices = devices_of(fresh.router)
    for name, entry in document["devices"].items():
        restore_device(devices[name], json.loads(json.dumps(entry)), name=name)
    return {**document, "checks": checks(fresh, scenario, after)}


def main(argv: list[str]) -> int:
    force = "--force" in argv
    wanted = [a for a in argv if not a.startswith("--")] or list(GOLDEN)
    GOLDEN_DIR.mkdir(exist_ok=True)
    for kind in wanted:
        path = GOLDEN_DIR / f"{kind}.json"
        if path.exists() and not force:
            print(f"{path}: kept (exists; --force {kind} rewrites it)")
            continue
        path.write_text(dump_state(golden(kind)))
        print(f"{path}: written")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
