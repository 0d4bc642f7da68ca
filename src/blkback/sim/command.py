"""Simulate Xen hosts running blkback's core: the seed's experiments, sweeps and fleets.

  blkback sim seed  [--out DIR]     the seed mail's three tables, simulated, beside the seed's
  blkback sim sweep --duration 1,10,100 --devices 50,100,200 [--replicas N] [--out DIR]
  blkback sim run   [--variant after] [--duration 10] ...   one host, all counters
  blkback sim policies [--quick] --out DIR   fixed durations 1-100 ms against auto, a grid
  blkback sim calibrate --repro DIR_OR_results.json --out DIR   a repro run, simulated

Hosts run locally by default (a Dask LocalCluster, or a process pool without Dask), or on a
Dask cluster with --scheduler tcp://HOST:8786. --profile reports wall time and events/s.
No privileges needed; nothing here touches the real host's memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from blkback.errors import ConfigError


class SimError(ConfigError):
    """A sim command was given something it cannot run (a usage error: exit status 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``sim`` and its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    common.add_argument("--profile", action="store_true", help="report wall time and events/s")
    common.add_argument(
        "--engine",
        choices=("auto", "serial", "processes", "dask"),
        default="auto",
        help="where hosts run (auto: dask local cluster, or serial for one host)",
    )
    common.add_argument("--scheduler", metavar="ADDR", help="Dask scheduler address (a cluster)")
    common.add_argument("--workers", type=int, help="local workers (default: CPUs)")
    common.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar (none is drawn unless stderr is a terminal)",
    )
    sub = parser.add_subparsers(dest="sim_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("seed", parents=[common], help="the seed's three experiments")
    p.add_argument("--out", type=Path, help="write report.md, results.json and PNG plots here")
    p.add_argument("--sim-seconds", type=float, default=60.0, help="per pressure run (60)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--no-extras", action="store_true", help="skip the 5.6/wake/graded runs beyond the seed"
    )

    p = sub.add_parser("sweep", parents=[common], help="a grid of hosts: CSV and heat maps")
    p.add_argument("--duration", default="10", help="squeeze durations, ms (e.g. 1,10,100)")
    p.add_argument("--max-buffer-pages", default="1024", help="e.g. 0,256,1024")
    p.add_argument("--devices", default="100", help="disks per host, e.g. 50,100,200")
    p.add_argument("--memory", default="2048", help="dom0 RAM in MiB, e.g. 1536,2048,3072")
    p.add_argument("--workload", default="bursty", help="bursty, random, dd")
    p.add_argument(
        "--background-iops",
        default="0",
        help="random I/O per disk between bursts, e.g. 0,200 (default 0: 2.6x cheaper per "
        "host than the seed scenario's 200, which gives the 10 ms knee)",
    )
    p.add_argument("--variant", default="after", help="before, after, 5.6, wake, graded")
    p.add_argument("--replicas", type=int, default=1, help="hosts (seeds) per grid point")
    p.add_argument("--sim-seconds", type=float, default=10.0, help="per host (10)")
    p.add_argument(
        "--io-quantum-ms",
        type=float,
        default=10.0,
        help="guest I/O batching (10; the seed runs use 5): coarser is faster",
    )
    p.add_argument("--out", type=Path, help="write results.csv and heat maps here")

    p = sub.add_parser(
        "policies",
        parents=[common],
        help="fixed squeeze durations (1-100 ms) against squeeze_policy=auto over a grid",
    )
    p.add_argument("--quick", action="store_true", help="a small grid, 2 s per host")
    p.add_argument("--sim-seconds", type=float, help="per host (10; --quick: 2)")
    p.add_argument("--out", type=Path, help="write results.json, report.md and policies.png")
    p.add_argument("--no-plots", action="store_true")

    p = sub.add_parser(
        "calibrate",
        parents=[common],
        help="simulate a blkback repro run's configurations; report them side by side",
    )
    p.add_argument(
        "--repro", type=Path, required=True, help="repro's results.json or its directory"
    )
    p.add_argument("--out", type=Path, help="write report.md, calibration.json and PNG plots")
    p.add_argument("--no-plots", action="store_true")

    p = sub.add_parser("run", parents=[common], help="one host; print every counter")
    p.add_argument("--variant", default="after", help="before, after, 5.6, wake, graded")
    p.add_argument("--duration", type=int, default=10, help="squeeze duration, ms")
    p.add_argument("--max-buffer-pages", type=int)
    p.add_argument("--devices", type=int)
    p.add_argument("--memory", type=int, help="dom0 RAM, MiB")
    p.add_argument("--workload", help="bursty, random, dd")
    p.add_argument("--sim-seconds", type=float, default=60.0)
    p.add_argument("--json", action="store_true")


def _list(text: str, kind: type) -> list[Any]:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SimError(f"cannot read {text!r} as a list of {kind.__name__}") from None


def run(args: argparse.Namespace) -> int:
    """Dispatch to the subcommand."""
    t0 = time.perf_counter()
    cmd = args.sim_command
    try:
        if cmd == "seed":
            events, hosts = _seed(args)
        elif cmd == "sweep":
            events, hosts = _sweep(args)
        elif cmd == "calibrate":
            events, hosts = _calibrate(args)
        elif cmd == "policies":
            events, hosts = _policies(args)
        else:
            events, hosts = _run_one(args)
    except ValueError as exc:
        raise SimError(str(exc)) from None
    wall = time.perf_counter() - t0
    if args.profile:
        print(
            f"profile: {hosts} hosts, {events:,} events in {wall:.2f} s wall: "
            f"{events / wall:,.0f} events/s ({wall / max(1, hosts):.2f} s/host)",
            file=sys.stderr,
        )
    return 0


def _seed(args: argparse.Namespace) -> tuple[int, int]:
    from blkback.progress import HostProgress
    from blkback.sim.seed import run_seed, summary, write_outputs

    doc = run_seed(
        seed=args.seed,
        sim_seconds=args.sim_seconds,
        engine=args.engine,
        scheduler=args.scheduler,
        workers=args.workers,
        progress=HostProgress("seed", enabled=not args.quiet),
        extras=not args.no_extras,
    )
    summary(doc, print)
    if args.out:
        for path in write_outputs(doc, args.out, plots=not args.no_plots):
            print(f"wrote {path}")
    runs = doc["config"]["runs"]
    return sum(int(r["events"]) for r in runs.values()), len(runs)


def _sweep(args: argparse.Namespace) -> tuple[int, int]:
    from blkback.progress import HostProgress
    from blkback.sim.runner import run_many
    from blkback.sim.sweep import build_grid, plot_heatmaps, rows, write_csv

    axes: dict[str, list[Any]] = {
        "duration": _list(args.duration, int),
        "max_buffer_pages": _list(args.max_buffer_pages, int),
        "devices": _list(args.devices, int),
        "memory": _list(args.memory, int),
        "workload": _list(args.workload, str),
        "background_iops": _list(args.background_iops, float),
        "variant": _list(args.variant, str),
    }
    points, scenarios = build_grid(
        axes,
        replicas=args.replicas,
        seed=args.seed,
        sim_seconds=args.sim_seconds,
        io_quantum_ms=args.io_quantum_ms,
    )
    results = run_many(
        scenarios,
        engine=args.engine,
        scheduler=args.scheduler,
        workers=args.workers,
        progress=HostProgress("sweep", enabled=not args.quiet),
    )
    table = rows(points, results)
    keys = [a for a in axes if len(axes[a]) > 1] or ["duration"]
    print(" ".join(f"{k:>10s}" for k in [*keys, "pswpin", "pswpout", "MB/s"]))
    for r in table:
        vals = [str(r[k]) for k in keys] + [
            f"{r['pswpin']:,}",
            f"{r['pswpout']:,}",
            f"{r['throughput_mbps']:.0f}",
        ]
        print(" ".join(f"{v:>10s}" for v in vals))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(args.out / "results.csv", table)
        print(f"wrote {args.out / 'results.csv'}")
        for path in plot_heatmaps(table, axes, args.out):
            print(f"wrote {path}")
    return sum(int(r["events"]) for r in results), len(results)


def _policies(args: argparse.Namespace) -> tuple[int, int]:
    from blkback.progress import HostProgress
    from blkback.sim.policies import POLICIES, run_policies, summary, write_outputs

    doc = run_policies(
        quick=args.quick,
        seed=args.seed,
        sim_seconds=args.sim_seconds,
        engine=args.engine,
        scheduler=args.scheduler,
        workers=args.workers,
        progress=HostProgress("policies", enabled=not args.quiet),
    )
    summary(doc, print)
    if args.out:
        for path in write_outputs(doc, args.out, plots=not args.no_plots):
            print(f"wrote {path}")
    return sum(int(e["events"]) for e in doc["grid"]), len(doc["grid"]) * len(POLICIES)


def _calibrate(args: argparse.Namespace) -> tuple[int, int]:
    from blkback.progress import HostProgress
    from blkback.sim.calibrate import calibrate, load_repro, summary, write_outputs

    try:
        doc = load_repro(args.repro)
    except (OSError, json.JSONDecodeError) as exc:
        raise SimError(f"cannot read {args.repro}: {exc}") from None
    cal = calibrate(
        doc,
        seed=args.seed,
        engine=args.engine,
        scheduler=args.scheduler,
        workers=args.workers,
        progress=HostProgress("calibrate", enabled=not args.quiet),
        source=str(args.repro),
    )
    summary(cal, print)
    if args.out:
        for path in write_outputs(cal, args.out, plots=not args.no_plots):
            print(f"wrote {path}")
    runs = [c["run"] for c in cal["configurations"].values()]
    return sum(int(r["events"]) for r in runs), len(runs)


def _run_one(args: argparse.Namespace) -> tuple[int, int]:
    from blkback.sim.scenario import run_scenario
    from blkback.sim.sweep import make_scenario

    point: dict[str, Any] = {"variant": args.variant, "duration": args.duration}
    for key in ("max_buffer_pages", "devices", "memory", "workload"):
        value = getattr(args, key)
        if value is not None:
            point[key] = value
    sc = make_scenario(point, seed=args.seed, sim_seconds=args.sim_seconds)
    result = run_scenario(sc)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for k, v in result.items():
            print(f"{k:24s} {v:,.1f}" if isinstance(v, float) else f"{k:24s} {v}")
    return int(result["events"]), 1
