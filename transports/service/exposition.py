"""The service's metrics in the Prometheus text exposition format, on an HTTP endpoint (``serve --metrics-port``).

The format is produced by the ``prometheus_client`` library, an optional
dependency (``pip install 'intercept-dispatch[metrics]'``). The endpoint
runs on the service's own event loop (the supervisor's, when each VM has a
worker process), not in a thread: a scrape gets the same statistics
document ``intercept-dispatch stats`` gets, each VM's part built between
two of its handler calls, so it needs no lock on the hot path.

Metric names start with ``intercept_dispatch_``; docs/SERVICE.md lists them.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from dispatcher import DispatchError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = ["EXTRA", "MetricsUnavailableError", "ServiceCollector", "check_metrics", "registry", "serve_metrics"]

log = logging.getLogger("intercept_dispatch.service")

EXTRA = "metrics"
"""The package extra that installs prometheus_client."""
MAX_REQUEST = 8192
"""The longest HTTP request head the endpoint reads."""
REQUEST_TIMEOUT = 10.0
"""Seconds a scraper has to send its request and take the answer."""


class MetricsUnavailableError(DispatchError):
    """The metrics endpoint was asked for, and prometheus_client is not installed."""


def check_metrics() -> None:
    """Raise :class:`MetricsUnavailableError` unless prometheus_client can be imported."""
    if importlib.util.find_spec("prometheus_client") is None:
        raise MetricsUnavailableError(
            f"--metrics-port needs the prometheus_client package: pip install 'intercept-dispatch[{EXTRA}]'"
        )


class ServiceCollector:
    """A prometheus_client collector over the statistics document (``report.stats_document``)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        document = self.snapshot()
        prefix = "intercept_dispatch_"
        counts = document["intercepts"]
        yield CounterMetricFamily(prefix + "intercepts", "Well-formed intercepts received.", value=counts["received"])
        errors = CounterMetricFamily(prefix + "intercept_errors", "Intercepts not completed, by why.", labels=["kind"])
        for kind, field in (
            ("protocol", "protocol_errors"),
            ("handler", "handler_failed"),
            ("deadline", "deadline_exceeded"),
            ("unsupported", "unsupported"),
            ("memory", "memory_errors"),
        ):
            errors.add_metric([kind], counts[field])
        yield errors
        unclaimed = CounterMetricFamily(
            prefix + "unclaimed_accesses", "Accesses to ports no device claims.", labels=["direction"]
        )
        unclaimed.add_metric(["read"], counts["unclaimed_reads"])
        unclaimed.add_metric(["write"], counts["unclaimed_writes"])
        yield unclaimed
        ports = CounterMetricFamily(prefix + "port_intercepts", "Intercepts received, by port.", labels=["port"])
        for port, count in document["ports"].items():
            ports.add_metric([port], count)
        yield ports
        connections = document["connections"]
        yield GaugeMetricFamily(prefix + "connections_open", "VMM connections open.", value=connections["open"])
        yield CounterMetricFamily(
            prefix + "connections", "VMM connections accepted since start.", value=connections["total"]
        )
        yield CounterMetricFamily(
            prefix + "connections_refused",
            "Connections refused (--allow-uid or a limit).",
            value=connections["refused"],
        )
        workers = document.get("workers")
        if workers is not None:
            yield GaugeMetricFamily(
                prefix + "workers", "Worker processes running (one per VM).", value=workers["running"]
            )
            yield CounterMetricFamily(
                prefix + "worker_failures",
                "Worker processes that ended unbidden (a crash, a kill, a hung handler).",
                value=workers["failed"],
            )
        round_trip = GaugeMetricFamily(
            prefix + "round_trip_seconds",
            "Sampled time from reading a batch to writing its first completion, as percentiles of the last samples.",
            labels=["quantile"],
        )
        for quantile, field in (("0.5", "p50_seconds"), ("0.9", "p90_seconds"), ("0.99", "p99_seconds")):
            if field in document["round_trip"]:
                round_trip.add_metric([quantile], document["round_trip"][field])
        yield round_trip
        labels = ["device", "ports", "vm"]
        calls = CounterMetricFamily(prefix + "handler_calls", "Handler calls, by device and VM.", labels=labels)
        failures = CounterMetricFamily(prefix + "handler_failures", "Handler calls that raised.", labels=labels)
        latency = HistogramMetricFamily(
            prefix + "handler_latency_seconds", "Sampled handler run time, by device and VM.", labels=labels
        )
        bounds = [*(repr(float(b)) for b in document["latency_bounds_seconds"]), "+Inf"]
        for vm in document["vms"]:
            for device in vm["devices"]:
                key = [device["name"], device["ports"], str(vm["id"])]
                calls.add_metric(key, device["calls"])
                failures.add_metric(key, device["failures"])
                histogram = device["latency"]
                cumulative, buckets = 0, []
                for bound, count in zip(bounds, histogram["counts"], strict=True):
                    cumulative += count
                    buckets.append((bound, float(cumulative)))
                latency.add_metric(key, buckets, histogram["sum_seconds"])
        yield calls
        yield failures
        yield latency


def registry(snapshot: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A registry holding the service's metrics and those of the process (CPU, memory, descriptors)."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    result = CollectorRegistry()
    ProcessCollector(registry=result)
    result.register(ServiceCollector(snapshot))
    return result


async def serve_metrics(
    listener: anyio.abc.Listener[anyio.abc.SocketStream], snapshot: Callable[[], Awaitable[dict[str, Any]]]
) -> None:
    """Answer ``GET /metrics`` (and ``/``) on ``listener`` until cancelled; the listener is closed at the end.

    ``snapshot`` gets the statistics document (from every worker, so it may await).
    """

    async def answer(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(REQUEST_TIMEOUT):
                    await _answer(stream, snapshot)
            except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, ValueError) as error:
                # A scraper that goes away or talks nonsense is its own problem, not the service's.
                log.debug("metrics endpoint: a request failed: %r", error)

    async with listener:
        await listener.serve(answer)


async def _answer(stream: anyio.abc.SocketStream, snapshot: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    from prometheus_client.exposition import choose_encoder

    head = b""
    while b"\r\n\r\n" not in head:
        if len(head) > MAX_REQUEST:
            await _respond(stream, "431 Request Header Fields Too Large", "text/plain", b"request too long\n")
            return
        head += await stream.receive(4096)
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    path = rest.partition(" ")[0].partition("?")[0]
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    if method not in ("GET", "HEAD"):
        await _respond(stream, "405 Method Not Allowed", "text/plain", b"only GET\n", extra="Allow: GET, HEAD\r\n")
    elif path not in ("/", "/metrics"):
        await _respond(stream, "404 Not Found", "text/plain", b"the metrics are at /metrics\n")
    else:
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        document = await snapshot()
        body = encoder(registry(lambda: document))
        await _respond(stream, "200 OK", content_type, b"" if method == "HEAD" else body, length=len(body))


async def _respond(
    stream: anyio.abc.SocketStream,
    status: str,
    content_type: str,
    body: bytes,
    *,
    extra: str = "",
    length: int | None = None,
) -> None:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n{extra}\r\n"
    )
    await stream.send(head.encode("latin-1") + body)
