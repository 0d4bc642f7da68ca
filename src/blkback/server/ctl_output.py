"""What ``blkback ctl`` prints: the control socket's answers as tables a person can read.

Only presentation lives here (the transport is the control client's): each function takes
the answer's dict and returns a rich renderable; :func:`to_text` renders one to plain text.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from blkback.core.pages import PAGE_SIZE
from blkback.core.params import ParamSpec, spec_for
from blkback.errors import ParamError
from blkback.pressure.display import monitor_status_lines
from blkback.storage.base import format_size

RING_COLUMNS_LEGEND = (
    "pool: free pages kept in the ring's pool now (the bytes they hold); peak: its largest "
    "size; in flight: pages held by requests being served; alloc, freed: pages allocated "
    "and freed since the ring began; lazy (where shown): freed pages the kernel may still "
    "hold (MADV_FREE) until it needs them; rd, wr, f, ds: read, write (and write-zeroes), flush "
    "and discard requests served (the kernel's st_rd_req, st_wr_req, st_f_req, st_ds_req); "
    "oo: requests that found no free request slot and waited (st_oo_req); err: requests "
    f"answered with an error; read, written: bytes moved. A page is {PAGE_SIZE} bytes."
)


def to_text(renderable: RenderableType, width: int = 160) -> str:
    """Plain text of a renderable (no colour, no trailing blanks), as a pipe sees it."""
    console = Console(file=io.StringIO(), width=width, color_system=None, soft_wrap=False)
    console.print(renderable)
    text: str = console.file.getvalue()  # type: ignore[attr-defined]
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def plural(n: int, noun: str) -> str:
    """``1 ring``, ``2 rings``."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def pages(n: int) -> str:
    """``256 (1 MiB)``: a count of pages with the bytes they hold."""
    return f"{n:,} ({format_size(n * PAGE_SIZE)})"


# -- parameters ------------------------------------------------------------------------------
def _spec(name: str) -> ParamSpec | None:
    try:
        return spec_for(name)
    except ParamError:  # a server newer than this client
        return None


def param_unit(name: str, spec: ParamSpec | None) -> str:
    """The unit of a parameter, from its kind and its name's suffix (``_ms``, ``_pages``)."""
    if spec is not None and spec.kind is bool:
        return "0/1"
    if spec is not None and spec.kind is str:
        return "|".join(spec.choices)
    for suffix, unit in (("_ms", "ms"), ("_us", "µs"), ("_s", "s"), ("_pages", "pages")):
        if name.endswith(suffix):
            return unit
    return ""


def show_value(value: object) -> str:
    """A parameter's value as ``ctl set`` takes it (booleans as 0/1)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def params_table(params: Mapping[str, object]) -> Table:
    """Every parameter as ``name=value`` (what ``ctl set`` and ``--param`` take, and what
    this command printed before it had columns), then unit, default and meaning."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("parameter=value", no_wrap=True)
    table.add_column("unit", no_wrap=True)
    table.add_column("default", justify="right", no_wrap=True)
    table.add_column("meaning")
    for name, value in params.items():
        spec = _spec(name)
        unit = param_unit(name, spec)
        if unit == "pages" and isinstance(value, int) and not isinstance(value, bool):
            unit = f"pages ({format_size(value * PAGE_SIZE)})"
        default = "" if spec is None else show_value(spec.default)
        meaning = spec.help if spec is not None else "(unknown to this client)"
        # Text, not str: a value or a help text with [brackets] is not rich markup.
        table.add_row(Text(f"{name}={show_value(value)}"), Text(unit), Text(default), Text(meaning))
    return table


# -- statistics ------------------------------------------------------------------------------
def _server_line(stats: Mapping[str, Any]) -> str:
    srv = stats["server"]
    pressure = stats["pressure"]
    line = (
        f"server pid {srv['pid']}, up {srv['uptime_s']:.0f} s, "
        f"{plural(srv['connections'], 'connection')} ({srv.get('connections_total', 0)} "
        f"accepted, {srv.get('connections_refused', 0)} refused), RSS "
        f"{format_size(srv['rss_bytes'])} ({srv['rss_bytes']:,} bytes), "
        f"{plural(pressure['reports'], 'pressure report')}"
    )
    latency = pressure.get("squeeze_latency_ms", {})
    if latency.get("count"):
        line += (
            f"; report to pools emptied: median {latency['p50']:.2f} ms, "
            f"p99 {latency['p99']:.2f} ms over the last {latency['count']}"
        )
    return line


def _device_line(dev: Mapping[str, Any], now_ms: float | None) -> str:
    if dev["squeezed"]:
        level = dev.get("squeeze_level")
        state = f"squeezed ({level})" if level else "squeezed"
        end_ms = dev.get("squeeze_end_ms")
        if end_ms is not None and now_ms is not None:
            state += f" for {end_ms - now_ms:,.0f} ms more"
    else:
        state = "not squeezed"
    line = (
        f"device {dev['name']}: {state}; {plural(dev['squeezes'], 'squeeze')} started by "
        f"{plural(dev.get('reclaims', 0), 'pressure report')}; {plural(len(dev['rings']), 'ring')}"
    )
    auto = dev.get("auto")
    if isinstance(auto, Mapping) and "duration_ms" in auto:
        line += f"; auto squeeze {auto['duration_ms']:g} ms"
        if auto.get("verdict"):
            line += f" ({auto['verdict']}: {auto.get('reason', '')})"
    return line


def rings_table(rings: list[Mapping[str, Any]]) -> Table:
    """One row per ring: pool in pages and bytes, page counters, request counters."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in ("ring", "pool", "peak", "in flight", "alloc", "freed"):
        table.add_column(name, justify="right", no_wrap=True)
    # Lazily freed pages (MADV_FREE), where the allocator reports them (issue 12).
    # Every ring reports pages_lazy; the column appears once some ring freed pages lazily.
    lazy = any(r.get("pages_lazy") or r.get("pages_lazily_freed") for r in rings)
    if lazy:
        table.add_column("lazy", justify="right", no_wrap=True)
    for name in ("rd", "wr", "f", "ds", "oo", "err", "read", "written"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rings:
        q = r["requests"]
        table.add_row(
            str(r["id"]),
            pages(r["pool_pages"]),
            pages(r["peak_pool_pages"]),
            pages(r["in_flight_pages"]),
            f"{r['pages_allocated']:,}",
            f"{r['pages_freed']:,}",
            *([pages(int(r.get("pages_lazy", 0)))] if lazy else []),
            *(f"{q.get(k, 0):,}" for k in ("rd", "wr", "f", "ds", "oo", "errors")),
            format_size(q.get("rd_bytes", 0)),
            format_size(q.get("wr_bytes", 0)),
        )
    return table


def stats_view(stats: Mapping[str, Any]) -> Group:
    """``ctl stats``: the server, each device and its rings, and what the columns mean."""
    parts: list[RenderableType] = [Text(_server_line(stats))]
    any_ring = False
    for dev in stats["devices"]:
        parts.append(Text(_device_line(dev, stats.get("now_ms"))))
        if dev["rings"]:
            any_ring = True
            parts.append(rings_table(dev["rings"]))
    retired = stats["server"].get("retired_rings", {})
    if retired.get("rings"):
        parts.append(
            Text(
                f"closed rings: {retired['rings']} (pages allocated "
                f"{pages(retired['pages_allocated'])}, freed {pages(retired['pages_freed'])})"
            )
        )
    if any_ring:
        parts.append(Text(RING_COLUMNS_LEGEND, style="dim"))
    return Group(*parts)


# -- pressure --------------------------------------------------------------------------------
def pressure_status_view(monitor: Mapping[str, Any] | None) -> Text:
    """``ctl pressure --status``: the server's pressure monitor, as text."""
    if monitor is None:
        return Text("the server listens to no pressure source (started with --pressure off)")
    return Text("\n".join(monitor_status_lines(monitor)))
