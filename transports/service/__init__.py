"""The device backend service and its VMM-side client.

:mod:`.server` serves a router's devices to VMM connections (the ``serve``
command), :mod:`.client` is what a VMM embeds to talk to it, :mod:`.poke`
the ``poke`` command; :mod:`.config`, :mod:`.devices`, :mod:`.stats` and
:mod:`.systemd` are the service's settings, device loading, statistics line
and service manager protocols. :mod:`.metrics` counts and times the
handlers per VM, :mod:`.report` and :mod:`.introspect` make the documents a
tool asks for with a control request (:mod:`.control`: the ``stats`` and
``inspect`` commands, :mod:`.stats_command` and :mod:`.inspect_command`),
:mod:`.exposition` serves them to Prometheus and :mod:`.ratelimit` keeps
repeated failures from flooding the log.
"""

from .client import ServiceClient, connect_service, io_intercept, spawn_service
from .config import ServiceConfig
from .devices import load_devices
from .server import Service, run
from .stats import format_stats

__all__ = [
    "Service",
    "ServiceClient",
    "ServiceConfig",
    "connect_service",
    "format_stats",
    "io_intercept",
    "load_devices",
    "run",
    "spawn_service",
]
