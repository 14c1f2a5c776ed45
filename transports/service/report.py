"""The documents a control request gets: statistics and device inspection, as JSON-ready dictionaries.

Both are built on the event loop between two handler calls, so each is a
consistent snapshot. docs/SERVICE.md describes their fields.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from dispatcher import DispatchError, EngineStats

from ..latency import LatencySamples
from .introspect import group_devices, register_like, registers_json
from .metrics import LATENCY_BOUNDS, HandlerMetrics, Histogram

__all__ = ["UnknownVmError", "inspect_document", "known_vms", "stats_document"]


class UnknownVmError(DispatchError):
    """No intercept from this VM has reached a handler."""


def known_vms(handlers: Iterable[HandlerMetrics]) -> list[int]:
    """The VMs (partition ids) whose intercepts have reached a handler, in order."""
    seen: set[int] = set()
    for entry in handlers:
        seen.update(entry.calls)
    return sorted(seen)


def _check_vm(vm: int | None, handlers: Sequence[HandlerMetrics]) -> None:
    if vm is None:
        return
    vms = known_vms(handlers)
    if vm not in vms:
        seen = ", ".join(str(v) for v in vms) or "none yet"
        raise UnknownVmError(f"no intercept from VM {vm} has reached a device; VMs seen: {seen}")


def _latency(histograms: Iterable[Histogram]) -> dict[str, Any]:
    total = Histogram()
    for histogram in histograms:
        total.merge(histogram)
    return total.to_json()


def _device_json(entry: HandlerMetrics, vm: int | None) -> dict[str, Any]:
    if vm is None:
        calls, failures = sum(entry.calls.values()), sum(entry.failures.values())
        latency = _latency(entry.latency.values())
    else:
        calls, failures = entry.calls.get(vm, 0), entry.failures.get(vm, 0)
        latency = _latency([entry.latency[vm]] if vm in entry.latency else [])
    return {"name": entry.name, "ports": entry.ports, "calls": calls, "failures": failures, "latency": latency}


def stats_document(
    *,
    service: dict[str, Any],
    connections: dict[str, int],
    stats: EngineStats,
    latency: LatencySamples,
    handlers: Sequence[HandlerMetrics],
    vm: int | None = None,
) -> dict[str, Any]:
    """The statistics: the service's totals, per device (all VMs), and per VM (only ``vm``, if given).

    Raises :class:`UnknownVmError` for a ``vm`` never seen.
    """
    _check_vm(vm, handlers)
    handlers = sorted(handlers, key=lambda entry: (entry.claim.first, entry.bulk))
    points = latency.percentiles(50, 90, 99)
    round_trip: dict[str, Any] = {"samples": len(latency.samples)}
    if points:
        round_trip.update(zip(("p50_seconds", "p90_seconds", "p99_seconds"), points, strict=True))
    vms = []
    for each in [vm] if vm is not None else known_vms(handlers):
        devices = [_device_json(entry, each) for entry in handlers if each in entry.calls]
        vms.append({
            "id": each,
            "calls": sum(d["calls"] for d in devices),
            "failures": sum(d["failures"] for d in devices),
            "devices": devices,
        })  # fmt: skip
    ports: Counter[int] = stats.per_port
    return {
        "service": service,
        "connections": connections,
        "intercepts": {
            "received": stats.intercepts,
            "completed": stats.completed,
            "protocol_errors": stats.protocol_errors,
            "handler_failed": stats.handler_failed,
            "deadline_exceeded": stats.deadline_exceeded,
            "unsupported": stats.unsupported,
            "memory_errors": stats.memory_errors,
            "unclaimed_reads": stats.unclaimed_reads,
            "unclaimed_writes": stats.unclaimed_writes,
        },
        "round_trip": round_trip,
        "latency_bounds_seconds": list(LATENCY_BOUNDS),
        "ports": {f"{port:#x}": count for port, count in sorted(ports.items())},
        "devices": [_device_json(entry, None) for entry in handlers],
        "vms": vms,
    }


def inspect_document(handlers: Sequence[HandlerMetrics], vm: int | None = None) -> dict[str, Any]:
    """Every device object behind the claims: its handlers, ports, calls (from ``vm``, or all) and attributes.

    Raises :class:`UnknownVmError` for a ``vm`` never seen.
    """
    _check_vm(vm, handlers)
    groups = group_devices(handlers)
    types = Counter(type(owner).__qualname__ for owner, _ in groups if owner is not None)
    numbered: Counter[str] = Counter()
    devices = []
    for owner, entries in groups:
        claims: list[dict[str, Any]] = [
            {"name": e.name, "ports": e.ports, "calls": e.calls.get(vm, 0) if vm is not None else sum(e.calls.values())}
            for e in entries
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
    return {"vm": vm, "devices": devices}
