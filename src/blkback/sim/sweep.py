"""Parameter grids over simulated hosts: build the scenarios, tabulate, plot heat maps.

Axes (each a list of values; the grid is their product, times ``replicas`` seeds):

* ``duration``: ``buffer_squeeze_duration_ms``
* ``max_buffer_pages``
* ``devices``: virtual disks per host (10 per VM)
* ``memory``: dom0 RAM in MiB (the other host sizes scale with it)
* ``workload``: ``bursty``, ``random``, ``dd``
* ``variant``: ``before`` (5.4, no shrinker), ``after`` (seed: global, lazy), ``5.6``
  (per device, lazy), ``wake`` (per device, waking), ``graded`` (``wake`` with the graded
  policy)
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from blkback.sim.scenario import Scenario, seed_pressure

AXES = (
    "duration",
    "max_buffer_pages",
    "devices",
    "memory",
    "workload",
    "background_iops",
    "variant",
)
METRICS = (
    "pswpin",
    "pswpout",
    "throughput_mbps",
    "peak_pool_mib",
    "pages_squeezed",
    "shrinker_calls",
    "kswapd_wakeups",
    "direct_reclaims",
    "alloc_failures",
    "failed_submits",
    "events",
)


def make_scenario(point: dict[str, Any], *, seed: int, sim_seconds: float) -> Scenario:
    """The host at one grid point (defaults: the seed's pressure scenario, 'after')."""
    sc = seed_pressure(
        str(point.get("variant", "after")), duration_ms=int(point.get("duration", 10)), seed=seed
    )
    sc.duration_s = sim_seconds
    if "max_buffer_pages" in point:
        sc.params["max_buffer_pages"] = int(point["max_buffer_pages"])
    if "devices" in point:
        n = int(point["devices"])
        sc.guests.vms = max(1, -(-n // 10))
        sc.guests.disks_per_vm = max(1, n // sc.guests.vms)
    if "memory" in point:
        # scale every host size with RAM, keeping the seed host's proportions
        ram = int(point["memory"])
        base = sc.host
        f = ram / base.ram_mib
        base.ram_mib = ram
        base.fixed_mib = int(base.fixed_mib * f)
        base.file_mib = int(base.file_mib * f)
        base.file_min_mib = int(base.file_min_mib * f)
        base.proc_anon_mib = int(base.proc_anon_mib * f)
    if "workload" in point:
        sc.guests.workload.kind = str(point["workload"])
    if "background_iops" in point:
        sc.guests.workload.background_iops = float(point["background_iops"])
    sc.name = "sweep:" + ",".join(f"{k}={v}" for k, v in point.items()) + f",seed={seed}"
    return sc


def build_grid(
    axes: Mapping[str, Sequence[Any]],
    *,
    replicas: int = 1,
    seed: int = 1,
    sim_seconds: float = 10.0,
    io_quantum_ms: float | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return (points, scenario dicts), one per host: every combination times every replica."""
    for name in axes:
        if name not in AXES:
            raise ValueError(f"unknown sweep axis {name!r} (known: {', '.join(AXES)})")
    names = list(axes)
    points: list[dict[str, Any]] = []
    scenarios: list[dict[str, Any]] = []
    for combo in itertools.product(*(axes[n] for n in names)):
        for r in range(replicas):
            point = dict(zip(names, combo, strict=True))
            host_seed = seed * 1_000_003 + len(points)
            point["replica"] = r
            points.append(point)
            sc = make_scenario(
                {k: v for k, v in point.items() if k != "replica"},
                seed=host_seed,
                sim_seconds=sim_seconds,
            )
            if io_quantum_ms is not None:
                sc.io_quantum_ms = io_quantum_ms
            scenarios.append(sc.to_dict())
    return points, scenarios


def rows(
    points: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One flat row per host: its grid point, seed and metrics."""
    out = []
    for point, res in zip(points, results, strict=True):
        row = dict(point)
        row["seed"] = res["seed"]
        for m in METRICS:
            row[m] = res.get(m)
        out.append(row)
    return out


def write_csv(path: Path, table: Sequence[dict[str, Any]]) -> None:
    if not table:
        path.write_text("")
        return
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)


def mean_grid(
    table: Sequence[dict[str, Any]], x: str, y: str, metric: str
) -> tuple[list[Any], list[Any], list[list[float]]]:
    """Mean of ``metric`` over every host at each (x, y), averaging the other axes."""
    xs = sorted({r[x] for r in table}, key=_order)
    ys = sorted({r[y] for r in table}, key=_order)
    acc: dict[tuple[Any, Any], list[float]] = {}
    for r in table:
        acc.setdefault((r[x], r[y]), []).append(float(r[metric]))
    grid = [[_mean(acc.get((xv, yv), [])) for xv in xs] for yv in ys]
    return xs, ys, grid


def _mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def _order(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, int | float) else (1, str(v))


def plot_heatmaps(
    table: Sequence[dict[str, Any]], axes: Mapping[str, Sequence[Any]], out: Path
) -> list[Path]:
    """Heat maps of swap-outs and throughput over the two axes with the most values."""
    varied = sorted((a for a in axes if len(axes[a]) > 1), key=lambda a: -len(axes[a]))
    if len(varied) < 2 or not table:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = varied[0], varied[1]
    paths = []
    for metric, label in (
        ("pswpout", "swap-outs (pswpout)"),
        ("throughput_mbps", "throughput MB/s"),
    ):
        xs, ys, grid = mean_grid(table, x, y, metric)
        fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 0.8 * len(ys) + 2))
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(xs)), [str(v) for v in xs])
        ax.set_yticks(range(len(ys)), [str(v) for v in ys])
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        others = list(varied[2:])
        ax.set_title(label + (f" (mean over {', '.join(others)})" if others else ""))
        for j, row in enumerate(grid):
            for i, v in enumerate(row):
                ax.text(i, j, f"{v:,.0f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = out / f"heatmap_{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
