"""The device backend service and its VMM-side client.

:mod:`.server` serves devices to VMM connections (the ``serve`` command):
by default :mod:`.supervisor` accepts them and hands each VM's to a
:mod:`.worker` process of its own over a :mod:`.worker_channel`;
:mod:`.opening` reads a connection's HELLO. :mod:`.client` is what a VMM embeds to talk to it, :mod:`.poke`
the ``poke`` command; :mod:`.config`, :mod:`.devices`, :mod:`.stats` and
:mod:`.systemd` are the service's settings, device loading, statistics line
and service manager protocols. :mod:`.metrics` counts and times the
handlers per VM, :mod:`.report` and :mod:`.introspect` make the documents a
tool asks for with a control request (:mod:`.control`: the ``stats`` and
``inspect`` commands, :mod:`.stats_command` and :mod:`.inspect_command`),
:mod:`.exposition` serves them to Prometheus and :mod:`.ratelimit` keeps
repeated failures from flooding the log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import ServiceClient, connect_service, io_intercept, spawn_service
from .config import ServiceConfig
from .devices import load_devices, shared
from .stats import format_stats

if TYPE_CHECKING:
    from .server import Service, run


def __getattr__(name: str) -> Any:
    # The server (and the worker module it uses) load on first use: a worker process runs
    # ``-m transports.service.worker``, which must not be imported by the package before that.
    if name in ("Service", "run"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Service",
    "ServiceClient",
    "ServiceConfig",
    "connect_service",
    "format_stats",
    "io_intercept",
    "load_devices",
    "run",
    "shared",
    "spawn_service",
]
