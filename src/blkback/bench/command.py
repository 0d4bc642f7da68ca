"""Benchmark blkback against nbdkit and qemu-nbd with fio over NBD (Unix sockets).

Servers: blkback (memory export), nbdkit memory with default threads and with --threads 1
(the better of the two per cell is "nbdkit", the one to beat), qemu-nbd on a raw file in
tmpfs. Each is started and stopped by the bench. Workloads: sequential 1 MiB write/read and
random 4 KiB write/read, each at QD1 and QD16, time-based after a ramp; servers interleaved
cell by cell, the matrix repeated (--repeat) and the median reported.

The same run measures the price of the pool and of squeezing on the QD16 cells: blkback with
max_buffer_pages=0 (blkback-nopool) and squeezed for the whole run (blkback-squeeze), as
overhead against default blkback and pages allocated per request, and whether a warm default
pool still allocates in steady state.

Output: a Markdown report on stdout (or JSON with --json); --out DIR also writes report.md,
results.json and report.png. Progress goes to stderr. Exit status 1 if any cell failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from blkback.bench.servers import SERVERS
from blkback.bench.workloads import GIB, KIB, MIB, QUICK_WORKLOADS, WORKLOADS
from blkback.errors import ConfigError

QUICK = {"runtime_s": 2.0, "ramp_s": 0.5, "repeat": 1, "size_bytes": 256 * MIB}
FULL = {"runtime_s": 5.0, "ramp_s": 1.0, "repeat": 3, "size_bytes": GIB}


def _size(text: str) -> int:
    units = {"k": KIB, "m": MIB, "g": GIB}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 1G)") from None


def _list(text: str, known: dict[str, Any], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ConfigError(f"unknown {what}: {', '.join(bad) or text!r}; known: {', '.join(known)}")
    return tuple(dict.fromkeys(names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"comma-separated subset of: {', '.join(SERVERS)} (default: all)",
    )
    parser.add_argument(
        "--workloads",
        default=None,
        help=f"comma-separated subset of: {', '.join(WORKLOADS)} (default: all; --quick: QD16)",
    )
    parser.add_argument("--repeat", type=int, default=None, help="repeats (default 3, quick 1)")
    parser.add_argument(
        "--runtime", type=float, default=None, help="measured seconds per cell (default 5, quick 2)"
    )
    parser.add_argument(
        "--ramp", type=float, default=None, help="fio ramp seconds per cell (default 1, quick 0.5)"
    )
    parser.add_argument(
        "--size",
        type=_size,
        default=None,
        help="fio region per server (default 1G, quick 256M); the export is always --export-size",
    )
    parser.add_argument("--export-size", type=_size, default=GIB, help="export size (default 1G)")
    parser.add_argument(
        "--tmpfs", default="/dev/shm", help="directory for qemu-nbd's image (default /dev/shm)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: ≤ 2 minutes, 1 repeat")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", type=Path, help="write report.md, results.json, report.png here")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")


def _environment() -> dict[str, Any]:
    from blkback.bench.runner import tool_versions

    cpu_model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tools": tool_versions(),
        "loadavg_before": _loadavg(),
    }


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run(args: argparse.Namespace) -> int:
    """Run the bench and print/write the report."""
    from blkback.bench.report import build_report, render_markdown, write_png
    from blkback.bench.runner import BenchConfig, run_bench

    d = QUICK if args.quick else FULL
    servers = _list(args.servers, SERVERS, "server")
    if args.workloads:
        workloads = _list(args.workloads, WORKLOADS, "workload")
    else:
        workloads = QUICK_WORKLOADS if args.quick else tuple(WORKLOADS)
    workloads = tuple(w for w in WORKLOADS if w in workloads)  # canonical order
    config = BenchConfig(
        servers=servers,
        workloads=workloads,
        repeat=args.repeat if args.repeat is not None else int(d["repeat"]),
        runtime_s=args.runtime if args.runtime is not None else d["runtime_s"],
        ramp_s=args.ramp if args.ramp is not None else d["ramp_s"],
        size_bytes=args.size if args.size is not None else int(d["size_bytes"]),
        export_size_bytes=args.export_size,
        tmpfs_dir=args.tmpfs,
        quick=args.quick,
    )
    if config.repeat < 1 or config.runtime_s <= 0 or config.ramp_s < 0:
        raise ConfigError("--repeat must be ≥ 1, --runtime > 0 and --ramp ≥ 0")
    if config.size_bytes > config.export_size_bytes:
        raise ConfigError("--size must not exceed --export-size")
    if all(SERVERS[s].price_only for s in servers) and not any(
        w in config.price_workloads for w in workloads
    ):
        raise ConfigError("the selected servers run no selected workload")
    n_cells = sum(len(config.cells(r)) for r in range(config.repeat))
    plan = (
        f"bench: {len(servers)} servers, {len(workloads)} workloads, {config.repeat} repeat(s): "
        f"{n_cells} cells, about {config.estimated_seconds() / 60:.1f} min"
    )
    print(plan, file=sys.stderr)
    if args.dry_run:
        for r in range(config.repeat):
            for w, s in config.cells(r):
                print(f"r{r} {w} {s}")
        return 0

    results = run_bench(config, _environment(), progress=lambda m: print(m, file=sys.stderr))
    results.environment["loadavg_after"] = _loadavg()
    report = build_report(results)
    markdown = render_markdown(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(markdown)
        (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
        write_png(report, args.out / "report.png")
        print(f"bench: wrote {args.out}/report.md, results.json, report.png", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(markdown, end="")
    return 0 if report["complete"] else 1
