"""Memory-pressure signals: which work here (``probe``) and what they report (``watch``).

blkback pressure probe [--json]          try every source and say why it works or not
blkback pressure watch [--seconds N]     print pressure events as they come
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

# Heavy imports stay inside run() so that `blkback --help` stays fast.


def add_arguments(parser: argparse.ArgumentParser) -> SubParsers:
    """Register ``probe`` and ``watch``; return the actions, for cli.py to add ``latency``.

    ``blkback pressure latency`` is a benchmark that starts a server: it lives in
    :mod:`blkback.bench.latency`, which ``pressure`` must not import (docs/design.md).
    """
    sub = parser.add_subparsers(dest="pressure_command", metavar="ACTION", required=True)
    p = sub.add_parser("probe", help="try every pressure source and explain the result")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    w = sub.add_parser("watch", help="print pressure events as they come")
    w.add_argument("--seconds", type=float, default=None, help="stop after N seconds")
    w.add_argument("--mode", default="auto", help="auto, or a comma list of source names")
    w.add_argument("--coalesce-ms", type=float, default=1.0, help="coalescing window (ms)")
    w.add_argument("--all", action="store_true", help="also print PSI samples that saw no pressure")
    w.add_argument("--json", action="store_true", help="one JSON object per line")
    return sub


def run(args: argparse.Namespace) -> int:
    """Run ``probe`` or ``watch``."""
    if args.pressure_command == "probe":
        return _probe(args)
    return _watch(args)


def _probe(args: argparse.Namespace) -> int:
    from blkback.pressure.cgroups import read_layout
    from blkback.pressure.display import probe_table
    from blkback.pressure.probe import layout_summary, probe

    layout = read_layout()
    statuses = probe(layout)
    if args.json:
        print(
            json.dumps(
                {"layout": layout_summary(layout), "sources": [s.as_dict() for s in statuses]},
                indent=2,
            )
        )
    else:
        from rich.console import Console

        console = Console()
        if console.is_terminal:  # a table that wraps the long details
            console.print(probe_table(layout_summary(layout), statuses))
        else:  # one line per source, for scripts and logs
            print(layout_summary(layout))
            for s in statuses:
                print(f"{s.name:<20} {'works' if s.works else 'NO':<6} {s.detail}")
    return 0 if any(s.works and s.name != "manual" for s in statuses) else 1


def _watch(args: argparse.Namespace) -> int:
    from blkback.clock import MonotonicClock
    from blkback.core.policy import PressureLevel
    from blkback.pressure.display import event_line, header_line, reasons_lines, summary_line
    from blkback.pressure.fusion import Decision
    from blkback.pressure.monitor import PressureMonitor
    from blkback.pressure.sources import SourceEvent

    clock = MonotonicClock()
    start = clock.now_ns()
    out_lock = threading.Lock()

    def show(event: SourceEvent, decision: Decision) -> None:
        if event.level is None and not args.all:
            return
        t = (event.now_ns - start) / 1e9
        level = event.level.name.lower() if event.level is not None else "none"
        fused = decision.level.name.lower() if decision.level is not None else "-"
        if args.json:
            line = json.dumps(
                {
                    "t": round(t, 4),
                    "source": event.source,
                    "level": level,
                    "count": event.count,
                    "decision": decision.reason,
                    "fused_level": fused,
                    "some": round(event.some, 4),
                    "full": round(event.full, 4),
                }
            )
        else:
            line = event_line(t, event.source, level, event.count, decision.reason, fused)
            if event.severity:
                line += f" (some {event.some:.1%}, full {event.full:.1%})"
        with out_lock:
            print(line, flush=True)

    def deliver(_level: PressureLevel, _source: str) -> None:
        return None

    monitor = PressureMonitor(
        deliver, mode=args.mode, clock=clock, coalesce_ms=args.coalesce_ms, on_event=show
    )
    done = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: done.set())
    monitor.start()
    try:
        status = monitor.status()
        print(header_line(status), file=sys.stderr, flush=True)
        for line in reasons_lines("unavailable sources", status["failed"]):  # type: ignore[arg-type]
            print(line, file=sys.stderr, flush=True)
        done.wait(args.seconds)
    finally:
        monitor.stop()
        signal.signal(signal.SIGTERM, previous)
    print(
        json.dumps(monitor.status()) if args.json else summary_line(monitor.status()),
        file=sys.stderr,
    )
    return 0
