"""Prometheus metrics over HTTP (``--metrics HOST:PORT``), built from the server's stats.

The series come from the same snapshot dicts as ``ctl stats --json`` (``Server.stats()``),
read at each scrape by a custom collector; ``prometheus_client`` does the exposition and the
process metrics (``process_cpu_seconds_total``, ``process_resident_memory_bytes``,
``process_open_fds``, ...). The HTTP endpoint is :class:`MetricsEndpoint`: its thread sleeps
until a scrape comes (``prometheus_client.start_http_server`` polls for its shutdown twice a
second, which an idle server must not do).

A counter added to a snapshot shows up without code here: every number in a ring's
``requests`` dict (``RingStats`` and its ``extra``) is a counter ``blkback_ring_<key>_total``,
every other number of a ring or device snapshot a gauge ``blkback_ring_<key>`` /
``blkback_device_<key>``, unless a table below gives it a better name, type and help.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any, Literal, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from blkback.errors import ConfigError

log = logging.getLogger("blkback.server")


class StatsSource(Protocol):
    """What the exporter needs of a server (``Server`` is one): its ``ctl stats`` snapshot."""

    def stats(self) -> dict[str, Any]:
        """Everything ``ctl stats --json`` shows."""
        ...


Kind = Literal["gauge", "counter"]


@dataclass(frozen=True, slots=True)
class Series:
    """How one snapshot field is exported: metric name (counters without ``_total``), type,
    help, optionally a fixed label (several fields of one metric told apart by it), a scale
    to the metric's base unit (ms to seconds: 0.001), and whether every scrape declares it
    (False for fields only some configurations report, such as the auto policy's)."""

    name: str
    kind: Kind
    help: str
    label: tuple[str, str] | None = None
    scale: float = 1.0
    declare: bool = True


def _requests(kind: str) -> Series:
    return Series("blkback_requests", "counter", "Requests handled, by kind", ("kind", kind))


def _released(reason: str) -> Series:
    return Series("blkback_pages_released", "counter", "Pages freed, by reason", ("reason", reason))


#: Fields of a ring snapshot (``Ring.snapshot()``), labelled ``device`` and ``ring``.
RING_SERIES: dict[str, Series | None] = {
    "id": None,
    "pool_pages": Series("blkback_pool_pages", "gauge", "Free pages in the ring's pool"),
    "in_flight_pages": Series("blkback_in_flight_pages", "gauge", "Pages held by requests"),
    "peak_pool_pages": Series("blkback_peak_pool_pages", "gauge", "Largest pool size seen"),
    "peak_in_flight_pages": Series(
        "blkback_peak_in_flight_pages", "gauge", "Most pages held by requests at once"
    ),
    "pages_allocated": Series("blkback_pages_allocated", "counter", "Pages allocated"),
    "pages_freed": Series("blkback_pages_freed", "counter", "Pages freed by shrinking"),
    "hits": Series("blkback_pool_hits", "counter", "Page requests served from the pool"),
    "misses": Series("blkback_pool_misses", "counter", "Page requests that allocated"),
    "last_pass_ms": None,  # a timestamp on the server's monotonic clock: meaningless outside
    "last_free_ms": None,
    # The allocator's release counts (issue 12: lazy freeing with MADV_FREE).
    "pages_held": Series(
        "blkback_pages_held",
        "gauge",
        "Pages the ring holds: its pool and its pages in flight",
        declare=False,
    ),
    "pages_lazy": Series(
        "blkback_pages_lazy",
        "gauge",
        "Pages freed lazily (MADV_FREE) and not reused since: the kernel may still hold them",
        declare=False,
    ),
    "pages_lazily_freed": Series(
        "blkback_pages_lazily_freed", "counter", "Pages freed lazily (MADV_FREE)", declare=False
    ),
    "pages_lazy_reused": Series(
        "blkback_pages_lazy_reused",
        "counter",
        "Lazily freed pages handed out again",
        declare=False,
    ),
    "pages_returned": Series(
        "blkback_pages_returned",
        "counter",
        "Pages given back at once (MADV_DONTNEED)",
        declare=False,
    ),
}
#: Counters of a ring's ``requests`` dict (``RingStats.as_dict()``).
REQUEST_SERIES: dict[str, Series | None] = {
    "rd": _requests("read"),
    "wr": _requests("write"),
    "f": _requests("flush"),
    "ds": _requests("trim"),
    "other": _requests("other"),
    "oo": Series(
        "blkback_request_slot_waits", "counter", "Requests that found no free request slot"
    ),
    "errors": Series("blkback_request_errors", "counter", "Requests answered with an error"),
    "rd_bytes": Series("blkback_read_bytes", "counter", "Bytes read by clients"),
    "wr_bytes": Series("blkback_written_bytes", "counter", "Bytes written by clients"),
    "pages_trimmed": _released("trim"),
    "pages_squeezed": _released("squeeze"),
    "refill_after_squeeze_pages": Series(
        "blkback_refill_after_squeeze_pages", "counter", "Pages allocated within 1 s of a squeeze"
    ),
}
#: Fields of a device snapshot (``Device.snapshot()``), labelled ``device``.
DEVICE_SERIES: dict[str, Series | None] = {
    "name": None,
    "rings": None,
    "squeeze_end_ms": None,  # a monotonic-clock timestamp
    "squeeze_level": None,
    "squeezes": Series("blkback_squeezes", "counter", "Squeeze windows started, per device"),
    "squeezed": Series("blkback_squeezed", "gauge", "Whether the device is squeezed now"),
    "reclaims": Series("blkback_reclaims", "counter", "Pressure reports received, per device"),
    # The auto policy's state (a nested dict "auto", flattened to auto_<key>).
    "auto_duration_ms": Series(
        "blkback_auto_squeeze_duration_seconds",
        "gauge",
        "The squeeze duration the auto policy has tuned for the device",
        scale=0.001,
        declare=False,
    ),
    "auto_lengthened": Series(
        "blkback_auto_lengthened",
        "counter",
        "Times the auto policy lengthened the squeeze",
        declare=False,
    ),
    "auto_shortened": Series(
        "blkback_auto_shortened",
        "counter",
        "Times the auto policy shortened the squeeze",
        declare=False,
    ),
}
#: Fields of ``stats["server"]``, unlabelled; the rest is left to the process collector.
SERVER_SERIES: dict[str, Series] = {
    "connections": Series("blkback_connections", "gauge", "Open NBD connections"),
    "connections_total": Series(
        "blkback_connections_accepted", "counter", "NBD connections accepted"
    ),
    "connections_refused": Series(
        "blkback_connections_refused", "counter", "NBD connections refused (limits, threads)"
    ),
}


def _auto(prefix: str, key: str, kind: Kind, where: str) -> Series:
    return Series(f"{prefix}_{key}", kind, f"{where} field {key!r} (see ctl stats --json)")


def _number(value: object) -> float | None:
    """The value of a numeric field (bools as 0/1); None for anything else."""
    if isinstance(value, bool | int | float):
        return float(value)
    return None


class _Families:
    """Metric families being filled, one per metric name, in first-seen order."""

    def __init__(self) -> None:
        self.by_name: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

    def declare(
        self, series: Series, label_names: list[str]
    ) -> GaugeMetricFamily | CounterMetricFamily:
        """The family of ``series``, created (with no sample yet) if new.

        Declaring the tables' families up front keeps their HELP and TYPE in every scrape,
        as a client library's labelled metric does before its first child.
        """
        family = self.by_name.get(series.name)
        if family is None:
            names = label_names + ([series.label[0]] if series.label else [])
            cls = CounterMetricFamily if series.kind == "counter" else GaugeMetricFamily
            family = cls(series.name, series.help, labels=names)
            self.by_name[series.name] = family
        return family

    def declare_table(self, table: Mapping[str, Series | None], label_names: list[str]) -> None:
        """Declare every family of a table."""
        for series in table.values():
            if series is not None and series.declare:
                self.declare(series, label_names)

    def add(self, series: Series, labels: dict[str, str], value: float) -> None:
        """One sample of ``series``."""
        family = self.declare(series, list(labels))
        values = list(labels.values()) + ([series.label[1]] if series.label else [])
        family.add_metric(values, value * series.scale)

    def add_fields(
        self,
        fields: Mapping[str, object],
        table: Mapping[str, Series | None],
        labels: dict[str, str],
        auto: tuple[str, Kind, str],
    ) -> None:
        """Export every numeric field: by the table, or by the ``auto`` naming rule. A nested
        dict's fields are ``<key>_<field>`` (a device's ``auto`` state: ``auto_duration_ms``)."""
        for key, value in fields.items():
            skipped = key in table and table[key] is None
            if isinstance(value, Mapping) and not skipped:
                nested = {f"{key}_{k}": v for k, v in value.items()}
                self.add_fields(nested, table, labels, auto)
                continue
            number = _number(value)
            if number is None:
                continue
            if key in table:
                series = table[key]
                if series is None:
                    continue
            else:
                series = _auto(auto[0], key, auto[1], auto[2])
            self.add(series, labels, number)


def families(stats: Mapping[str, Any]) -> Iterator[Metric]:
    """The metric families of a ``Server.stats()`` dict."""
    out = _Families()
    out.declare_table(DEVICE_SERIES, ["device"])
    out.declare_table(RING_SERIES, ["device", "ring"])
    out.declare_table(REQUEST_SERIES, ["device", "ring"])
    for dev in stats["devices"]:
        dev_labels = {"device": str(dev["name"])}
        out.add_fields(dev, DEVICE_SERIES, dev_labels, ("blkback_device", "gauge", "device"))
        for ring in dev["rings"]:
            labels = {**dev_labels, "ring": str(ring["id"])}
            scalars = {k: v for k, v in ring.items() if k != "requests"}
            out.add_fields(scalars, RING_SERIES, labels, ("blkback_ring", "gauge", "ring"))
            out.add_fields(
                ring["requests"], REQUEST_SERIES, labels, ("blkback_ring", "counter", "ring")
            )
    server = stats["server"]
    for key, series in SERVER_SERIES.items():
        if key in server:
            out.add(series, {}, float(server[key]))
    out.add_fields(
        server.get("retired_rings", {}),
        {},
        {},
        ("blkback_retired", "counter", "closed rings' total"),
    )
    pressure = stats["pressure"]
    out.add(
        Series("blkback_pressure_reports", "counter", "Pressure reports delivered to the devices"),
        {},
        float(pressure["reports"]),
    )
    events = Series(
        "blkback_pressure_events", "counter", "Pressure events seen, by source and level"
    )
    for key, count in sorted(pressure["events"].items()):
        source, _, level = key.partition(":")
        out.add(events, {"source": source, "level": level}, float(count))
    latency = Series(
        "blkback_squeeze_latency_seconds",
        "gauge",
        "Time from a report to every idle ring's pool at its target, over the last reports",
    )
    for quantile, field in (("0.5", "p50"), ("0.99", "p99"), ("1", "max")):
        if field in pressure["squeeze_latency_ms"]:
            value = pressure["squeeze_latency_ms"][field] / 1000
            out.add(latency, {"quantile": quantile}, value)
    param = Series("blkback_param", "gauge", "Numeric runtime parameters (see ctl params)")
    choice = Series(
        "blkback_param_choice", "gauge", "Runtime parameters that name a choice: 1 for the one set"
    )
    for name, value in stats["params"].items():
        number = _number(value)
        if number is not None:
            out.add(param, {"name": name}, number)
        elif isinstance(value, str):
            out.add(choice, {"name": name, "value": value}, 1.0)
    yield from out.by_name.values()


class ServerCollector(Collector):
    """Reads ``server.stats()`` at every scrape."""

    def __init__(self, server: StatsSource) -> None:
        self.server = server

    def collect(self) -> Iterable[Metric]:
        """The families of the server's current stats."""
        return list(families(self.server.stats()))


def registry_for(server: StatsSource) -> CollectorRegistry:
    """A registry with the server's series and the process collector."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(ServerCollector(server))
    return registry


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base names it)
        """A scrape is not news: no line on stderr per request."""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the server's exit


class MetricsEndpoint:
    """``/metrics`` over HTTP, served from a daemon thread that sleeps until a scrape comes.

    The thread waits in ``handle_request`` with no timeout; :meth:`stop` wakes it by
    shutting the listening socket down, which on Linux makes it readable and its
    ``accept`` fail.
    """

    def __init__(self, httpd: WSGIServer) -> None:
        self.httpd = httpd
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="metrics", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port."""
        host, port = self.httpd.server_address[:2]
        return (host.decode() if isinstance(host, bytes) else str(host)), int(port)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping:
            self.httpd.handle_request()

    def stop(self) -> None:
        """Stop serving and close the socket (scrapes in progress finish on their own)."""
        self._stopping = True
        try:
            self.httpd.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not listening any more
        self._thread.join(5.0)
        self.httpd.server_close()


def start_metrics(server: StatsSource, address: str) -> MetricsEndpoint:
    """Serve ``/metrics`` on ``HOST:PORT`` (``[v6]:PORT`` too) from a daemon thread."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--metrics {address!r}: expected HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    try:
        family = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][0]
        server_class = type(
            "MetricsHTTPServer", (_ThreadingWSGIServer,), {"address_family": family}
        )
        httpd: WSGIServer = make_server(
            host, int(port), make_wsgi_app(registry_for(server)), server_class, _QuietHandler
        )
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from exc
    endpoint = MetricsEndpoint(httpd)
    endpoint.start()
    bound, bound_port = endpoint.address
    shown = f"[{bound}]" if ":" in bound else bound
    log.info("metrics on http://%s:%d/metrics", shown, bound_port)
    return endpoint
