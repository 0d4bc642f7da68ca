"""Read and change a running server's parameters, statistics and squeeze state.

blkback ctl params [--json]             all runtime parameters: value, unit, meaning
blkback ctl get NAME                    one parameter's value
blkback ctl set NAME VALUE              change one (like writing /sys/module/.../parameters)
blkback ctl stats [--json]              pools, rings, requests, squeezes per device
blkback ctl pressure [--level L]        report memory pressure by hand (as reclaim would)
blkback ctl pressure --status [--json]  which pressure sources the server listens to

--control PATH (the server's control socket) goes before or after the action.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from blkback.server.control_client import request

if TYPE_CHECKING:
    from rich.console import RenderableType

CONTROL_HELP = "the server's control socket (default: the one server running; 'serve' prints it)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``ctl``'s options and actions."""
    parser.add_argument("--control", metavar="PATH", help=CONTROL_HELP)
    # Each action takes --control too, without a default of its own: argparse would let the
    # action's default overwrite a --control given before the action.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--control", metavar="PATH", default=argparse.SUPPRESS, help=CONTROL_HELP)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    pa = sub.add_parser("params", parents=[common], help="all runtime parameters, with meaning")
    pa.add_argument("--json", action="store_true", help="one JSON object of values")
    g = sub.add_parser("get", parents=[common], help="print one parameter")
    g.add_argument("name")
    s = sub.add_parser("set", parents=[common], help="change one parameter")
    s.add_argument("name")
    s.add_argument("value")
    st = sub.add_parser("stats", parents=[common], help="pool and request statistics")
    st.add_argument("--json", action="store_true", help="one JSON object")
    p = sub.add_parser(
        "pressure", parents=[common], help="report memory pressure, or show the monitor"
    )
    p.add_argument("--level", default="critical", choices=["low", "medium", "critical"])
    p.add_argument("--status", action="store_true", help="show pressure sources instead")
    p.add_argument("--json", action="store_true", help="with --status: one JSON object")


def run(args: argparse.Namespace) -> int:
    """Do one control action and print its result."""
    from blkback.server import ctl_output as out
    from blkback.server.server import find_control_path

    path = args.control or find_control_path()
    if args.action == "params":
        params = request(path, {"op": "params"})["params"]
        _print(json.dumps(params) if args.json else out.params_table(params))
    elif args.action == "get":
        print(out.show_value(request(path, {"op": "get", "name": args.name})["value"]))
    elif args.action == "set":
        a = request(path, {"op": "set", "name": args.name, "value": args.value})
        print(f"{a['name']}: {out.show_value(a['old'])} -> {out.show_value(a['value'])}")
    elif args.action == "stats":
        stats = request(path, {"op": "stats"})
        _print(json.dumps(stats) if args.json else out.stats_view(stats))
    elif args.action == "pressure":
        if args.status:
            monitor = request(path, {"op": "pressure-status"})["monitor"]
            _print(json.dumps(monitor) if args.json else out.pressure_status_view(monitor))
        else:
            a = request(path, {"op": "pressure", "level": args.level})
            print(f"pressure {a['level']} reported to {a['devices']} devices")
    return 0


def _print(what: RenderableType) -> None:
    """JSON as it is; tables through rich: colour on a terminal, and in a pipe plain lines
    that never wrap (scripts read them line by line)."""
    if isinstance(what, str):
        print(what)
        return
    from rich.console import Console

    from blkback.server.ctl_output import to_text

    console = Console()
    if console.is_terminal:
        console.print(what)
    else:
        print(to_text(what, width=1000), end="")
