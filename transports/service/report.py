"""The documents a control request gets: statistics and device inspection, as JSON-ready dictionaries.

Every VM has its own devices and dispatcher (in its own worker process,
unless the service runs ``--in-process``), so each VM reports its **part**
(:func:`vm_part`, :func:`vm_devices`) and the service merges the parts into
one document (:func:`merge_stats`, :func:`merge_inspect`). A part is built
on its VM's event loop between two handler calls, so each VM's numbers are
a consistent snapshot. docs/SERVICE.md describes the fields.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from dispatcher import DispatchError, EngineStats

from ..latency import LatencySamples
from .introspect import group_devices, register_like, registers_json
from .metrics import LATENCY_BOUNDS, HandlerMetrics, Histogram

__all__ = [
    "INTERCEPT_FIELDS",
    "ROUND_TRIP_SAMPLES",
    "UnknownVmError",
    "inspect_document",
    "merge_inspect",
    "merge_stats",
    "vm_devices",
    "vm_part",
]

INTERCEPT_FIELDS = (
    "received",
    "completed",
    "protocol_errors",
    "handler_failed",
    "deadline_exceeded",
    "unsupported",
    "memory_errors",
    "unclaimed_reads",
    "unclaimed_writes",
)
"""The counts of a document's ``intercepts`` part, in order."""
ROUND_TRIP_SAMPLES = 1000
"""The most recent round-trip samples a VM's part carries to the merged percentiles."""


class UnknownVmError(DispatchError):
    """No VM of this id is served (no VMM has opened a connection for it, or its worker has gone)."""


def _latency(histograms: Iterable[Histogram]) -> dict[str, Any]:
    total = Histogram()
    for histogram in histograms:
        total.merge(histogram)
    return total.to_json()


def _device_json(entry: HandlerMetrics) -> dict[str, Any]:
    return {
        "name": entry.name,
        "ports": entry.ports,
        "calls": sum(entry.calls.values()),
        "failures": sum(entry.failures.values()),
        "latency": _latency(entry.latency.values()),
    }


def vm_part(
    vm: int,
    *,
    stats: EngineStats,
    latency: LatencySamples,
    handlers: Sequence[HandlerMetrics],
    connections: dict[str, int],
) -> dict[str, Any]:
    """One VM's statistics: its intercept counts, ports, latest round trips and devices, for :func:`merge_stats`."""
    handlers = sorted(handlers, key=lambda entry: (entry.claim.first, entry.bulk))
    samples = list(latency.samples)[-ROUND_TRIP_SAMPLES:]
    return {
        "vm": vm,
        "connections": connections,
        "intercepts": dict(zip(INTERCEPT_FIELDS, _counts(stats), strict=True)),
        "ports": {f"{port:#x}": count for port, count in sorted(stats.per_port.items())},
        "round_trip_samples": samples,
        "devices": [_device_json(entry) for entry in handlers],
    }


def _counts(stats: EngineStats) -> tuple[int, ...]:
    return (
        stats.intercepts,
        stats.completed,
        stats.protocol_errors,
        stats.handler_failed,
        stats.deadline_exceeded,
        stats.unsupported,
        stats.memory_errors,
        stats.unclaimed_reads,
        stats.unclaimed_writes,
    )


def _check_vm(vm: int | None, served: Iterable[int]) -> None:
    if vm is None:
        return
    vms = sorted(served)
    if vm not in vms:
        seen = ", ".join(str(v) for v in vms) or "none yet"
        raise UnknownVmError(f"VM {vm} is not served (no VMM has connected for it); VMs served: {seen}")


def _merge_devices(lists: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for devices in lists:
        for device in devices:
            key = (device["name"], device["ports"])
            total = merged.get(key)
            if total is None:
                merged[key] = {**device, "latency": dict(device["latency"])}
                continue
            total["calls"] += device["calls"]
            total["failures"] += device["failures"]
            mine, theirs = total["latency"], device["latency"]
            mine["samples"] += theirs["samples"]
            mine["sum_seconds"] += theirs["sum_seconds"]
            mine["counts"] = [a + b for a, b in zip(mine["counts"], theirs["counts"], strict=True)]
    return list(merged.values())


def merge_stats(
    *, service: dict[str, Any], connections: dict[str, int], parts: Sequence[dict[str, Any]], vm: int | None = None
) -> dict[str, Any]:
    """The statistics document from every VM's part: totals, per device (all VMs), per VM (only ``vm``, if given).

    Raises :class:`UnknownVmError` for a ``vm`` no part is of.
    """
    _check_vm(vm, (part["vm"] for part in parts))
    intercepts = dict.fromkeys(INTERCEPT_FIELDS, 0)
    ports: Counter[int] = Counter()
    latency = LatencySamples()
    for part in parts:
        for field in INTERCEPT_FIELDS:
            intercepts[field] += part["intercepts"][field]
        ports.update({int(port, 16): count for port, count in part["ports"].items()})
        latency.samples.extend(part["round_trip_samples"])
    points = latency.percentiles(50, 90, 99)
    round_trip: dict[str, Any] = {"samples": len(latency.samples)}
    if points:
        round_trip.update(zip(("p50_seconds", "p90_seconds", "p99_seconds"), points, strict=True))
    vms = []
    for part in sorted(parts, key=lambda p: int(p["vm"])):
        if vm is not None and part["vm"] != vm:
            continue
        devices = [device for device in part["devices"] if device["calls"]]
        vms.append({
            "id": part["vm"],
            "calls": sum(d["calls"] for d in devices),
            "failures": sum(d["failures"] for d in devices),
            "devices": devices,
        })  # fmt: skip
    return {
        "service": service,
        "connections": connections,
        "intercepts": intercepts,
        "round_trip": round_trip,
        "latency_bounds_seconds": list(LATENCY_BOUNDS),
        "ports": {f"{port:#x}": count for port, count in sorted(ports.items())},
        "devices": _merge_devices(part["devices"] for part in parts),
        "vms": vms,
    }


def vm_devices(handlers: Sequence[HandlerMetrics]) -> list[dict[str, Any]]:
    """One VM's device objects behind its claims: handlers, ports, calls and register-like attributes."""
    groups = group_devices(handlers)
    types = Counter(type(owner).__qualname__ for owner, _ in groups if owner is not None)
    numbered: Counter[str] = Counter()
    devices = []
    for owner, entries in groups:
        claims: list[dict[str, Any]] = [
            {"name": e.name, "ports": e.ports, "calls": sum(e.calls.values())} for e in entries
        ]
        registers: dict[str, Any] = {}
        if owner is None:
            name, kind = entries[0].name, "function"
        else:
            cls = type(owner)
            name = cls.__qualname__
            if types[name] > 1:
                numbered[name] += 1
                name = f"{name}#{numbered[name]}"
            kind, registers = f"{cls.__module__}.{cls.__qualname__}", registers_json(register_like(owner))
        devices.append({
            "name": name,
            "type": kind,
            "calls": sum(c["calls"] for c in claims),
            "handlers": claims,
            "registers": registers,
        })  # fmt: skip
    return devices


def merge_inspect(parts: Sequence[tuple[int, list[dict[str, Any]]]], vm: int | None = None) -> dict[str, Any]:
    """The inspection document from each VM's devices (:func:`vm_devices`); only VM ``vm``'s if given.

    Each device names its VM (``"vm"``). Raises :class:`UnknownVmError` for
    a ``vm`` no part is of.
    """
    _check_vm(vm, (each for each, _ in parts))
    devices = [
        {"vm": each, **device}
        for each, listed in sorted(parts, key=lambda p: p[0])
        if vm is None or each == vm
        for device in listed
    ]
    return {"vm": vm, "devices": devices}


def inspect_document(handlers: Sequence[HandlerMetrics], vm: int) -> dict[str, Any]:
    """The inspection document of one VM whose claims' metrics are ``handlers``."""
    return merge_inspect([(vm, vm_devices(handlers))], vm)
