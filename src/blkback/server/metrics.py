"""Prometheus metrics over HTTP (``--metrics HOST:PORT``), read from the server's stats."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from blkback.errors import ConfigError

if TYPE_CHECKING:
    from blkback.server.server import Server

RING_GAUGES = {
    "pool_pages": ("blkback_pool_pages", "gauge", "Free pages in the ring's pool"),
    "in_flight_pages": ("blkback_in_flight_pages", "gauge", "Pages held by requests"),
    "peak_pool_pages": ("blkback_peak_pool_pages", "gauge", "Largest pool size seen"),
    "pages_allocated": ("blkback_pages_allocated_total", "counter", "Pages allocated"),
    "pages_freed": ("blkback_pages_freed_total", "counter", "Pages freed by shrinking"),
}
RING_REQUESTS = {
    "rd": "read",
    "wr": "write",
    "f": "flush",
    "ds": "trim",
    "other": "other",
    "errors": "error",
}


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(stats: dict[str, Any]) -> str:
    """The Prometheus text exposition of a ``Server.stats()`` dict."""
    lines: list[str] = []
    for metric, kind, text in RING_GAUGES.values():
        lines += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}"]
    lines += [
        "# HELP blkback_requests_total Requests handled, by kind",
        "# TYPE blkback_requests_total counter",
        "# HELP blkback_pages_released_total Pages freed, by reason",
        "# TYPE blkback_pages_released_total counter",
        "# HELP blkback_refill_after_squeeze_pages_total Pages allocated within 1 s of a squeeze",
        "# TYPE blkback_refill_after_squeeze_pages_total counter",
        "# HELP blkback_squeezes_total Squeeze windows started, per device",
        "# TYPE blkback_squeezes_total counter",
        "# HELP blkback_squeezed Whether the device is squeezed now",
        "# TYPE blkback_squeezed gauge",
    ]
    for dev in stats["devices"]:
        d = _esc(dev["name"])
        lines.append(f'blkback_squeezes_total{{device="{d}"}} {dev["squeezes"]}')
        lines.append(f'blkback_squeezed{{device="{d}"}} {int(dev["squeezed"])}')
        for ring in dev["rings"]:
            lab = f'device="{d}",ring="{ring["id"]}"'
            for key, (metric, _, _) in RING_GAUGES.items():
                lines.append(f"{metric}{{{lab}}} {ring[key]}")
            req = ring["requests"]
            for key, kind in RING_REQUESTS.items():
                lines.append(f'blkback_requests_total{{{lab},kind="{kind}"}} {req[key]}')
            for reason in ("trimmed", "squeezed"):
                lines.append(
                    f'blkback_pages_released_total{{{lab},reason="{reason[:-1]}"}} '
                    f"{req['pages_' + reason]}"
                )
            lines.append(
                f"blkback_refill_after_squeeze_pages_total{{{lab}}} "
                f"{req['refill_after_squeeze_pages']}"
            )
    srv = stats["server"]
    lines += [
        "# TYPE blkback_connections gauge",
        f"blkback_connections {srv['connections']}",
        "# TYPE blkback_rss_bytes gauge",
        f"blkback_rss_bytes {srv['rss_bytes']}",
        "# TYPE blkback_pressure_reports_total counter",
        f"blkback_pressure_reports_total {stats['pressure']['reports']}",
        "# TYPE blkback_pressure_events_total counter",
    ]
    for key, count in sorted(stats["pressure"]["events"].items()):
        source, _, level = key.partition(":")
        lines.append(
            f'blkback_pressure_events_total{{source="{_esc(source)}",level="{level}"}} {count}'
        )
    for name, value in stats["params"].items():
        if isinstance(value, bool | int):
            lines.append(f'blkback_param{{name="{name}"}} {int(value)}')
    return "\n".join(lines) + "\n"


def start_metrics(server: Server, address: str) -> ThreadingHTTPServer:
    """Serve ``/metrics`` on ``HOST:PORT`` from a daemon thread."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--metrics {address!r}: expected HOST:PORT")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = render(server.stats()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

    try:
        httpd = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {address}: {exc.strerror}") from exc
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return httpd
