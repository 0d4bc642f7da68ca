"""Reproduce the seed's three experiments on real memory pressure, and go beyond them.

  blkback repro [memory-pressure|duration-sweep|overhead|all] [--quick] [--out DIR]

memory-pressure  dom0 = a memory cgroup with a limit and swap, holding `blkback serve` and a
                 memory hog; guests outside it write bursts to many null-backed devices.
                 squeeze off (buffer_squeeze_duration_ms=0) vs on (10 ms): pswpin/pswpout,
                 beside the seed's 76,672 / 185,799 -> 212 / 3,325. Beyond the seed: the
                 kernel's lazy squeeze (squeeze_wake=0), squeeze_policy=graded and =auto.
duration-sweep   the same with buffer_squeeze_duration_ms 1, 10, 100.
overhead         ext4 on nbdfuse + loop over a blkback export (outside the cgroup), the seed's
                 dd loop with max_buffer_pages 1024 then 0, on a ~40 MB/s and a fast volume.
all              everything (default).

Needs root, a cgroup v1 memory controller and swap (the host's, or a temporary swapfile it
makes); the overhead experiment also needs nbdfuse, losetup, mkfs.ext4 and /dev/fuse. It
refuses to start, in one line, when one is missing. Everything it creates (cgroups,
swapfile, mounts, loop devices, processes) is removed at the end, also on Ctrl-C.
Writes DIR/report.md, DIR/results.json and PNG plots (default DIR: ./repro-results).
"""

from __future__ import annotations

import argparse
from typing import Any

EXPERIMENTS = ("memory-pressure", "duration-sweep", "overhead", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``repro``'s options."""
    parser.add_argument(
        "experiment", nargs="?", default="all", choices=EXPERIMENTS, help="what to run (all)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="one short run per configuration (<= 5 minutes)"
    )
    parser.add_argument("--out", default="repro-results", metavar="DIR", help="output directory")
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per configuration (3; 1 with --quick)"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="measured seconds per run (60; 15 quick)"
    )
    parser.add_argument("--devices", type=int, default=None, help="guest devices (64)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--from-results",
        metavar="FILE",
        help="run nothing: aggregate FILE's raw runs again and rewrite the report in --out",
    )


def run(args: argparse.Namespace) -> int:
    """Check the host, run the experiments, write the report."""
    from blkback.errors import ConfigError, EnvironmentProblem
    from blkback.repro.testbed import missing_facilities

    if args.repeats is not None and args.repeats < 1:
        raise ConfigError("--repeats must be at least 1")
    if args.from_results:
        from pathlib import Path

        from blkback.repro.runner import rerender

        out = Path(args.out)
        rerender(Path(args.from_results), out, plots=not args.no_plots)
        print(f"report: {out / 'report.md'}")
        return 0
    want_overhead = args.experiment in ("overhead", "all")
    missing = missing_facilities(need_overhead=want_overhead)
    if missing:
        raise EnvironmentProblem("cannot run, this host lacks: " + "; ".join(missing))
    from blkback.repro.runner import Runner

    runner = Runner(args)
    results: dict[str, Any] = runner.run()
    print(f"report: {runner.out / 'report.md'}")
    return 0 if results.get("complete") else 1
