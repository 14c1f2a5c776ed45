"""Benchmarks: the project beside a baseline in the same run, with the ratio.

    python bench/run.py            # every section, full length
    python bench/run.py --quick    # every section, under a minute
    python bench/run.py --json     # also print one JSON object as the last line
    python bench/run.py --only core,service

Each section is a module in this folder with ``run(quick: bool) -> dict``
returning named figures; it prints its own human-readable lines.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

# Sections in the order they run; each is bench/<name>.py.
SECTIONS = ["core", "strings", "replay", "service", "isolation", "kvm", "snapshot"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (under 60 s in all)")
    parser.add_argument("--json", action="store_true", help="print every figure as one JSON object last")
    parser.add_argument("--only", default="", help="comma-separated section names")
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(here))
    sys.path.insert(0, here)
    wanted = [s for s in args.only.split(",") if s] or SECTIONS
    figures: dict[str, object] = {}
    for name in wanted:
        module = importlib.import_module(name)
        print(f"== {name}", flush=True)
        figures.update(module.run(args.quick))
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
