"""A pressure monitor's status (``PressureMonitor.status()``) as lines a person can read.

Shared by ``blkback pressure watch`` (its header and summary) and ``blkback ctl pressure
--status`` (a running server's monitor); ``--json`` on either gives the dict itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

    from blkback.pressure.probe import SourceStatus


def _levels(counts: Mapping[str, Any]) -> str:
    return ", ".join(f"{level} {n}" for level, n in counts.items())


def _source_state(info: Mapping[str, Any]) -> str:
    """The source's own fields beyond its detail, e.g. ``some 1.5%, full 0.0%``."""
    parts = []
    for key, value in info.items():
        if key in ("detail", "running") or value is None:
            continue
        if key in ("some", "full") and isinstance(value, float):
            parts.append(f"{key} {value:.1%}")
        else:
            parts.append(f"{key.replace('_', ' ')} {value}")
    if info.get("running") is False:
        parts.append("stopped")
    return "; ".join(parts)


def _severity(value: object) -> str:
    if value == "stale":
        return "unknown (no recent sample from a polled source)"
    return str(value or "none")


def reasons_lines(title: str, reasons: Mapping[str, str]) -> list[str]:
    """``title:`` and one indented ``name: reason`` line per entry (nothing when empty)."""
    if not reasons:
        return []
    return [f"{title}:", *(f"  {name}: {why}" for name, why in reasons.items())]


def header_line(status: Mapping[str, Any]) -> str:
    """One line: which sources are listened to, and how many could not be."""
    line = f"watching: active {', '.join(status['active']) or 'no source'}"
    if status.get("failed"):
        line += f" ({len(status['failed'])} sources unavailable: {', '.join(status['failed'])})"
    return line


def summary_line(status: Mapping[str, Any]) -> str:
    """One line: what the monitor saw and delivered."""
    delivered = _levels(status.get("delivered", {})) or "none"
    return (
        f"events seen {sum(sum(c.values()) for c in status.get('events', {}).values())}; "
        f"delivered {delivered}; coalesced {status.get('coalesced', 0)}; "
        f"unconfirmed {status.get('unconfirmed', 0)}"
    )


#: What the fuser did with an event (``Decision.reason``), in words.
DECISIONS = {
    "delivered": "delivered to the devices as {fused}",
    "coalesced": "coalesced (a delivery at least as strong was just made)",
    "unconfirmed": "not delivered: low pressure that no other source confirms",
    "sample": "a sample, no pressure",
}


def event_line(t_s: float, source: str, level: str, count: int, reason: str, fused: str) -> str:
    """``pressure watch``'s line for one event."""
    what = DECISIONS.get(reason, reason).format(fused=fused)
    times = f" x{count}" if count != 1 else ""
    return f"{t_s:9.3f} s  {source:<18} {level:<8}{times:<5} {what}"


def monitor_status_lines(status: Mapping[str, Any]) -> list[str]:
    """The whole status, a few lines per source."""
    lines = [
        f"pressure monitor: mode {status['mode']}, "
        f"{'running' if status.get('running') else 'stopped'}; "
        f"pressure now: {_severity(status.get('severity'))}"
    ]
    sources = status.get("sources", {})
    lines.append("active sources:")
    for name in status.get("active", []):
        info = sources.get(name, {})
        state = _source_state(info)
        detail = info.get("detail") or (
            "reports by hand (ctl pressure)" if name == "manual" else ""
        )
        lines.append(f"  {name}: {detail}" + (f" [{state}]" if state else ""))
    lines += reasons_lines("unavailable sources", status.get("failed", {}))
    lines += reasons_lines("not started", status.get("skipped", {}))
    events = status.get("events", {})
    if events:
        lines.append("events by source:")
        lines += [f"  {name}: {_levels(counts)}" for name, counts in events.items()]
    else:
        lines.append("events by source: none yet")
    lines.append(
        f"delivered to the devices: {_levels(status.get('delivered', {})) or 'none'}; "
        f"coalesced {status.get('coalesced', 0)} (window {status.get('coalesce_ms', 0):g} ms); "
        f"unconfirmed {status.get('unconfirmed', 0)}; "
        f"delivery errors {status.get('deliver_errors', 0)}"
    )
    last = status.get("last_delivery")
    if last:
        lines.append(
            f"last delivery: {last['level']} from {last['source']}, {last['age_s']:.1f} s ago"
        )
    return lines


def probe_table(layout: str, statuses: Sequence[SourceStatus]) -> Table:
    """``pressure probe`` on a terminal: one row per source, details wrapped."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(layout), title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("source", no_wrap=True)
    table.add_column("works", no_wrap=True)
    table.add_column("why", overflow="fold")
    for s in statuses:
        works = Text("yes") if s.works else Text("no", style="bold red")
        table.add_row(Text(s.name), works, Text(s.detail))  # Text: no markup in details
    return table
