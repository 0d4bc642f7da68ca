"""Read and change a running server's parameters, statistics and squeeze state.

blkback ctl params                      all runtime parameters
blkback ctl get NAME                    one parameter
blkback ctl set NAME VALUE              change one (like writing /sys/module/.../parameters)
blkback ctl stats [--json]              pools, rings, requests, squeezes per device
blkback ctl pressure [--level L]        report memory pressure by hand (as reclaim would)
blkback ctl pressure --status           which pressure sources the server listens to
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from blkback.server.control_client import request


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``ctl``'s options and actions."""
    parser.add_argument("--control", metavar="PATH", help="the server's control socket")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("params", help="print all runtime parameters")
    g = sub.add_parser("get", help="print one parameter")
    g.add_argument("name")
    s = sub.add_parser("set", help="change one parameter")
    s.add_argument("name")
    s.add_argument("value")
    st = sub.add_parser("stats", help="pool and request statistics")
    st.add_argument("--json", action="store_true", help="one JSON object")
    p = sub.add_parser("pressure", help="report memory pressure, or show the monitor")
    p.add_argument("--level", default="critical", choices=["low", "medium", "critical"])
    p.add_argument("--status", action="store_true", help="show pressure sources instead")


def run(args: argparse.Namespace) -> int:
    """Do one control action and print its result."""
    from blkback.server.server import default_control_path

    path = args.control or default_control_path()
    if args.action == "params":
        for name, value in request(path, {"op": "params"})["params"].items():
            print(f"{name}={_show(value)}")
    elif args.action == "get":
        print(_show(request(path, {"op": "get", "name": args.name})["value"]))
    elif args.action == "set":
        a = request(path, {"op": "set", "name": args.name, "value": args.value})
        print(f"{a['name']}: {_show(a['old'])} -> {_show(a['value'])}")
    elif args.action == "stats":
        stats = request(path, {"op": "stats"})
        if args.json:
            print(json.dumps(stats))
        else:
            print(format_stats(stats))
    elif args.action == "pressure":
        if args.status:
            print(json.dumps(request(path, {"op": "pressure-status"})["monitor"], indent=2))
        else:
            a = request(path, {"op": "pressure", "level": args.level})
            print(f"pressure {a['level']} reported to {a['devices']} devices")
    return 0


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def format_stats(stats: dict[str, Any]) -> str:
    """A human table of the stats object."""
    lines = []
    srv = stats["server"]
    lines.append(
        f"server pid {srv['pid']}  up {srv['uptime_s']:.0f}s  connections {srv['connections']}  "
        f"rss {srv['rss_bytes'] / 2**20:.1f} MiB  pressure reports {stats['pressure']['reports']}"
    )
    for dev in stats["devices"]:
        state = "squeezed" if dev["squeezed"] else "normal"
        lines.append(f"device {dev['name']}: {state}, squeezes {dev['squeezes']}")
        for r in dev["rings"]:
            q = r["requests"]
            lines.append(
                f"  ring {r['id']}: pool {r['pool_pages']} (peak {r['peak_pool_pages']}) "
                f"in-flight {r['in_flight_pages']} alloc {r['pages_allocated']} "
                f"freed {r['pages_freed']} | rd {q['rd']} wr {q['wr']} f {q['f']} "
                f"ds {q['ds']} oo {q['oo']} err {q['errors']}"
            )
    return "\n".join(lines)
