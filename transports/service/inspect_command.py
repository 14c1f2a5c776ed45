"""``intercept-dispatch inspect``: the devices of a running service and their register-like attributes.

::

    intercept-dispatch inspect --vm 0        # the devices, with VM 0's calls
    intercept-dispatch inspect --json        # the document itself

Each device object behind the claims is listed with its ports, its calls
and its public int, bool and bytes attributes (integers in hex), read by
the service without calling any handler or property (see
:mod:`transports.service.introspect`). The devices are shared by every VM
the service serves; ``--vm`` picks whose calls are counted, and is refused
(exit status 1) for a VM that has sent no intercept to a device yet.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .command_line import CommandParser
from .control import Request
from .stats_command import EXIT_STATUSES, add_common_options, ask

__all__ = ["format_inspect_text", "main"]


BYTES_PER_ROW = 16


def _value(value: Any, indent: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:#x}"
    cut = isinstance(value, dict)  # bytes cut short: {"hex": ..., "length": N}
    text, length = (value["hex"], value["length"]) if cut else (str(value), len(str(value)) // 2)
    if not text:
        return "(no bytes)"
    data = bytes.fromhex(text)
    if len(data) <= BYTES_PER_ROW and not cut:
        return data.hex(" ")
    # Longer values as a dump: 16 bytes a row, each row's offset first.
    rows = [f"{at:02x}: {data[at : at + BYTES_PER_ROW].hex(' ')}" for at in range(0, len(data), BYTES_PER_ROW)]
    if cut:
        rows.append(f"... ({length} bytes in all)")
    return f"({length} bytes)\n" + "\n".join(indent + row for row in rows)


def _calls(count: int) -> str:
    return f"{count} call{'' if count == 1 else 's'}"


def format_inspect_text(document: dict[str, Any]) -> str:
    """The inspection document as an indented list, for people."""
    vm = document["vm"]
    devices = document["devices"]
    vms = sorted({device.get("vm") for device in devices if device.get("vm") is not None})
    whose = f"VM {vm}'s" if vm is not None else f"{len(vms)} VMs'"
    lines = [f"{len(devices)} devices ({whose}; each VM has devices of its own)"]
    for device in devices:
        owner = f"VM {device['vm']}: " if vm is None and "vm" in device else ""
        lines += ["", f"{owner}{device['name']} ({device['type']}): {_calls(device['calls'])}"]
        for handler in device["handlers"]:
            lines.append(f"  {handler['ports']:<20} {handler['name']}: {_calls(handler['calls'])}")
        registers = device["registers"]
        if registers:
            width = max(len(name) for name in registers)
            lines += [f"    {name:<{width}}  {_value(value, ' ' * (width + 6))}" for name, value in registers.items()]
    return "\n".join(lines)


def _parser() -> CommandParser:
    parser = CommandParser(
        prog="intercept-dispatch inspect",
        description="Show a running service's devices: each device object behind the claims, its ports, "
        "its calls and its public int, bool and bytes attributes, read without calling any of its code "
        "(its saved state is `poke --vm ID save FILE`).\n\n"
        "  intercept-dispatch inspect --socket /tmp/dispatch.sock --vm 0",
        exit_statuses=EXIT_STATUSES,
    )
    add_common_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``inspect`` command; returns the exit status (``stats_command.EXIT_STATUSES``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    return ask(parser, args, Request.INSPECT, format_inspect_text)


if __name__ == "__main__":
    sys.exit(main())
