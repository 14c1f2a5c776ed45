"""What the devices behind a router hold, read without running any of their code.

Claims are grouped by the object their handler belongs to (the ``self`` of
a bound method, or a callable object itself); a plain function is a device
of its own. For each object, its public attributes that are integers,
booleans or bytes are read straight from its ``__dict__`` and slots:
properties and handlers are never called, so looking cannot change a
device's state. Until devices offer a state API of their own, these
attributes are the nearest thing to their registers.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterable
from typing import Any

from .metrics import HandlerMetrics

__all__ = ["device_of", "group_devices", "register_like", "registers_json"]

MAX_BYTES = 256
"""Bytes of a bytes attribute shown (all 128 of a CMOS); longer values are cut and say their length."""


def device_of(handler: object) -> object | None:
    """The object a handler belongs to: a bound method's ``self``, a callable object itself; None for a function."""
    handler = getattr(handler, "__wrapped__", handler)
    if isinstance(handler, types.FunctionType | types.BuiltinFunctionType):
        return None
    if isinstance(handler, types.MethodType):
        owner: object = handler.__self__
        return None if isinstance(owner, type) else owner  # a classmethod belongs to no one device
    return handler  # an object with __call__


def register_like(device: object) -> dict[str, int | bool | bytes]:
    """The public int, bool and bytes attributes of ``device``, read without calling anything, sorted by name."""
    values: dict[str, Any] = {}
    for cls in reversed(type(device).__mro__):
        # Plain class attributes (a default io_base, say); a descriptor is no int, so none is run.
        values.update((name, value) for name, value in vars(cls).items() if isinstance(value, int | bytes))
        for slot in _slot_names(cls):
            with contextlib.suppress(AttributeError):  # an empty slot
                values[slot] = object.__getattribute__(device, slot)  # a slot is a plain member: no code runs
    instance_dict = getattr(device, "__dict__", None)
    if isinstance(instance_dict, dict):
        values.update(instance_dict)
    found: dict[str, int | bool | bytes] = {}
    for name in sorted(values):
        value = values[name]
        if name.startswith("_"):
            continue
        if isinstance(value, bool):
            found[name] = value
        elif isinstance(value, int):
            found[name] = int(value)
        elif isinstance(value, bytes | bytearray):
            found[name] = bytes(value)
    return found


def _slot_names(cls: type) -> tuple[str, ...]:
    slots = cls.__dict__.get("__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(slots)


def registers_json(values: dict[str, int | bool | bytes]) -> dict[str, Any]:
    """The attributes for a JSON document: ints and bools as they are, bytes as a hex string (cut at 256 bytes)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, bytes):
            shown = value[:MAX_BYTES].hex()
            out[name] = {"hex": shown, "length": len(value)} if len(value) > MAX_BYTES else shown
        else:
            out[name] = value
    return out


def group_devices(metrics: Iterable[HandlerMetrics]) -> list[tuple[object | None, list[HandlerMetrics]]]:
    """The claims grouped by device object (a function's claims each stand alone), in order of first port."""
    groups: dict[int, tuple[object | None, list[HandlerMetrics]]] = {}
    for entry in sorted(metrics, key=lambda m: (m.claim.first, m.bulk)):
        owner = device_of(entry.claim.handler)
        key = id(owner) if owner is not None else id(entry)
        groups.setdefault(key, (owner, []))[1].append(entry)
    return list(groups.values())
