"""Fixed squeeze durations against ``squeeze_policy=auto`` over a grid of hosts.

``blkback sim policies [--quick] --out DIR`` runs every grid point (workload x devices x dom0
memory) once per policy: the kernel policy with a fixed duration of 1, 5, 10, 50 and 100 ms,
and ``auto`` (which starts from 10 ms). Every policy of a point runs on the same host with
the same seed and one random stream per disk (``Scenario.disk_rng``), so the guests issue the
same I/O whatever order of events a policy causes (common random numbers: the comparison is
not drowned in the noise of one shared stream).
The hosts are the seed's pressure scenario with blkback's defaults (per-device deadline,
waking squeeze: the ``wake`` variant), since ``auto`` is meant to be switched on in a server
running with them.

Per run: ``pswpout`` and ``pswpin`` of dom0, and ``refills``: pages the rings allocated
within 1 s after a pass freed pages because of a squeeze (``refill_after_squeeze_pages``),
that is pages freed only to be taken again.

Targets (:func:`verdict`): at every point no fixed duration beats ``auto`` on both pswpout
and refills by more than 10 %; over the grid, ``auto``'s pswpout is at most the 10 ms
default's and its refills at most the 100 ms duration's.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from blkback.sim.runner import Progress, run_many
from blkback.sim.scenario import Scenario
from blkback.sim.sweep import make_scenario

FIXED_MS = (1, 5, 10, 50, 100)
POLICIES = (*(str(d) for d in FIXED_MS), "auto")
AUTO_START_MS = 10  # auto starts from the default duration
METRICS = ("pswpout", "pswpin", "refills")
MARGIN = 0.10  # "beats auto by more than 10 %": below 90 % of auto's value

# The random workload at its default 200 IOPS never fills the pools enough to cause
# pressure; at 2000 IOPS (4-128 KiB) it keeps every ring's queue full on the seed's 38.7 MB/s
# volume, which is the random writer that can.
RANDOM_IOPS = 2000.0

FULL_AXES: dict[str, tuple[Any, ...]] = {
    "workload": ("bursty", "random", "dd"),
    "devices": (50, 100, 200),
    "memory": (1536, 2048),
}
FULL_SECONDS = 10.0
QUICK_AXES: dict[str, tuple[Any, ...]] = {
    "workload": ("bursty", "random", "dd"),
    "devices": (20,),
    "memory": (384, 512),
}
QUICK_SECONDS = 2.0


def grid_points(axes: dict[str, tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Every combination of the axes, in order."""
    names = list(axes)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes.values())]


def policy_scenario(
    point: dict[str, Any], policy: str, *, seed: int, sim_seconds: float
) -> Scenario:
    """The host at ``point`` running ``policy`` (a fixed duration in ms, or ``"auto"``)."""
    duration = AUTO_START_MS if policy == "auto" else int(policy)
    sc = make_scenario(
        {"variant": "wake", "duration": duration, **point}, seed=seed, sim_seconds=sim_seconds
    )
    sc.disk_rng = True  # the same guest I/O under every policy: common random numbers
    if point.get("workload") == "random":
        sc.guests.workload.iops = RANDOM_IOPS
    if policy == "auto":
        sc.params["squeeze_policy"] = "auto"
    sc.name = "policies:" + ",".join(f"{k}={v}" for k, v in point.items()) + f",policy={policy}"
    return sc


def run_policies(
    *,
    quick: bool = False,
    seed: int = 1,
    sim_seconds: float | None = None,
    engine: str = "auto",
    scheduler: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the grid; return the results.json document."""
    axes = QUICK_AXES if quick else FULL_AXES
    seconds = sim_seconds if sim_seconds is not None else (QUICK_SECONDS if quick else FULL_SECONDS)
    points = grid_points(axes)
    scenarios = []
    for i, point in enumerate(points):
        for policy in POLICIES:
            sc = policy_scenario(point, policy, seed=seed * 1_000_003 + i, sim_seconds=seconds)
            scenarios.append(sc.to_dict())
    results = run_many(
        scenarios, engine=engine, scheduler=scheduler, workers=workers, progress=progress
    )
    grid = []
    runs = iter(results)
    for point in points:
        entry: dict[str, Any] = {"point": point, "policies": {}}
        for policy in POLICIES:
            r = next(runs)
            entry["policies"][policy] = {m: int(r[m]) for m in METRICS}
            if policy == "auto":
                entry["auto"] = r.get("auto", {})
            entry.setdefault("events", 0)
            entry["events"] += int(r["events"])
        grid.append(entry)
    return {
        "grid": grid,
        "totals": totals(grid),
        "verdict": verdict(grid),
        "config": {
            "quick": quick,
            "seed": seed,
            "sim_seconds": seconds,
            "axes": {k: list(v) for k, v in axes.items()},
            "policies": list(POLICIES),
            "variant": "wake",
            "random_iops": RANDOM_IOPS,
            "auto_start_ms": AUTO_START_MS,
        },
    }


def totals(grid: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Each policy's metrics summed over the grid."""
    return {p: {m: sum(int(e["policies"][p][m]) for e in grid) for m in METRICS} for p in POLICIES}


def beats(a: dict[str, int], b: dict[str, int], margin: float = MARGIN) -> bool:
    """Whether ``a`` is lower than ``b`` by more than ``margin`` on both pswpout and refills."""
    return all(a[m] < (1 - margin) * b[m] for m in ("pswpout", "refills"))


def verdict(grid: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The targets, checked: which fixed durations beat auto where, and the two totals."""
    beaten = []
    for e in grid:
        pol = e["policies"]
        by = [p for p in POLICIES if p != "auto" and beats(pol[p], pol["auto"])]
        if by:
            beaten.append({"point": e["point"], "by": by})
    tot = totals(grid)
    auto = tot["auto"]
    return {
        "points_beaten": beaten,
        "pswpout_le_10ms": auto["pswpout"] <= tot["10"]["pswpout"],
        "refills_le_100ms": auto["refills"] <= tot["100"]["refills"],
        "met": not beaten
        and auto["pswpout"] <= tot["10"]["pswpout"]
        and auto["refills"] <= tot["100"]["refills"],
    }


# -- report -------------------------------------------------------------------------------


def _label(point: dict[str, Any]) -> str:
    return f"{point['workload']} {point['devices']} dev {point['memory']} MiB"


def _best(entry: dict[str, Any], metric: str) -> str:
    pol = entry["policies"]
    low = min(pol[p][metric] for p in POLICIES)
    best = [p if p == "auto" else f"{p} ms" for p in POLICIES if pol[p][metric] == low]
    return "all" if len(best) == len(POLICIES) else ", ".join(best)


def _auto_durations(entry: dict[str, Any]) -> str:
    durations = entry.get("auto", {}).get("durations_ms", {})
    if not durations:
        return "-"
    return " ".join(f"{k}:{v}" for k, v in sorted(durations.items(), key=lambda kv: float(kv[0])))


def report_markdown(doc: dict[str, Any]) -> str:
    """Tables: per point pswpout and refills of every policy, the winners, the totals."""
    cfg = doc["config"]
    heads = [p if p == "auto" else f"{p} ms" for p in POLICIES]
    lines = [
        "# Squeeze policies: fixed durations against `auto`",
        "",
        f"`blkback sim policies{' --quick' if cfg['quick'] else ''}`: "
        f"{len(doc['grid'])} points x {len(POLICIES)} policies, {cfg['sim_seconds']:g} s "
        f"simulated per host, seed {cfg['seed']}, variant `{cfg['variant']}` "
        "(per-device deadline, waking squeeze); random I/O at "
        f"{cfg['random_iops']:g} IOPS per disk. `auto` starts from {cfg['auto_start_ms']} ms.",
        "",
        "pswpout / refills per policy (refills: pages allocated within 1 s after a squeeze). "
        "*beaten by*: fixed durations lower than auto by more than 10 % on both.",
        "",
        "| point | " + " | ".join(heads) + " | best pswpout | best refills | beaten by "
        "| auto's durations (ms: devices) |",
        "|---|" + "---:|" * len(heads) + "---|---|---|---|",
    ]
    beaten = {
        json.dumps(b["point"], sort_keys=True): b["by"] for b in doc["verdict"]["points_beaten"]
    }
    for e in doc["grid"]:
        pol = e["policies"]
        cells = [f"{pol[p]['pswpout']:,} / {pol[p]['refills']:,}" for p in POLICIES]
        by = beaten.get(json.dumps(e["point"], sort_keys=True), [])
        lines.append(
            f"| {_label(e['point'])} | "
            + " | ".join(cells)
            + f" | {_best(e, 'pswpout')} | {_best(e, 'refills')} | "
            + (", ".join(f"{p} ms" for p in by) or "none")
            + f" | {_auto_durations(e)} |"
        )
    tot = doc["totals"]
    lines += [
        "",
        "## Totals over the grid",
        "",
        "| policy | pswpout | pswpin | refills |",
        "|---|---:|---:|---:|",
    ]
    for p, h in zip(POLICIES, heads, strict=True):
        lines.append(
            f"| {h} | {tot[p]['pswpout']:,} | {tot[p]['pswpin']:,} | {tot[p]['refills']:,} |"
        )
    v = doc["verdict"]
    n_beaten = len(v["points_beaten"])
    lines += [
        "",
        "## Targets",
        "",
        "* no fixed duration beats auto on both by more than 10 % at any point: "
        + ("met" if not n_beaten else f"NOT met at {n_beaten} points"),
        f"* auto's total pswpout <= 10 ms's ({tot['auto']['pswpout']:,} vs "
        f"{tot['10']['pswpout']:,}): {'met' if v['pswpout_le_10ms'] else 'NOT met'}",
        f"* auto's total refills <= 100 ms's ({tot['auto']['refills']:,} vs "
        f"{tot['100']['refills']:,}): {'met' if v['refills_le_100ms'] else 'NOT met'}",
        "",
    ]
    return "\n".join(lines)


def plot_policies(doc: dict[str, Any], out: Path) -> Path:
    """Each fixed duration at each point, relative to auto (pswpout x refills), and totals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    for p in POLICIES[:-1]:
        xs, ys = [], []
        for e in doc["grid"]:
            a = e["policies"]["auto"]
            f = e["policies"][p]
            if a["pswpout"] and a["refills"]:
                xs.append(f["pswpout"] / a["pswpout"])
                ys.append(f["refills"] / a["refills"])
        ax.scatter(xs, ys, label=f"{p} ms", s=18)
    ax.axvline(1 - MARGIN, color="grey", lw=0.8, ls="--")
    ax.axhline(1 - MARGIN, color="grey", lw=0.8, ls="--")
    ax.fill_between([0, 1 - MARGIN], 0, 1 - MARGIN, color="red", alpha=0.08)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pswpout / auto's")
    ax.set_ylabel("refills / auto's")
    ax.set_title(
        "fixed durations per grid point where auto swapped,\nrelative to auto "
        "(red: beats auto on both by > 10 %)"
    )
    ax.legend(fontsize=8)
    tot = doc["totals"]
    heads = [p if p == "auto" else f"{p} ms" for p in POLICIES]
    x = range(len(POLICIES))
    bx.bar([i - 0.2 for i in x], [tot[p]["pswpout"] for p in POLICIES], 0.4, label="pswpout")
    bx2 = bx.twinx()
    bx2.bar(
        [i + 0.2 for i in x],
        [tot[p]["refills"] for p in POLICIES],
        0.4,
        color="tab:orange",
        label="refills",
    )
    bx.set_xticks(list(x), heads)
    bx.set_ylabel("pswpout (pages, total)")
    bx2.set_ylabel("refills (pages, total)")
    bx.set_title("totals over the grid")
    handles = bx.get_legend_handles_labels()[0] + bx2.get_legend_handles_labels()[0]
    bx.set_ylim(0, 1.3 * max(tot[p]["pswpout"] for p in POLICIES) or 1)
    bx2.set_ylim(0, 1.3 * max(tot[p]["refills"] for p in POLICIES) or 1)
    bx2.legend(handles=handles, loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout()
    path = out / "policies.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(doc: dict[str, Any], out: Path, *, plots: bool = True) -> list[Path]:
    """results.json, report.md and (with ``plots``) policies.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "report.md"]
    paths[0].write_text(json.dumps(doc, indent=1) + "\n")
    paths[1].write_text(report_markdown(doc))
    if plots:
        paths.append(plot_policies(doc, out))
    return paths


def summary(doc: dict[str, Any], emit: Callable[[str], None]) -> None:
    """The totals and the targets, one line each."""
    tot = doc["totals"]
    for p in POLICIES:
        name = p if p == "auto" else f"{p} ms"
        emit(f"{name:>7s}  pswpout {tot[p]['pswpout']:>10,}  refills {tot[p]['refills']:>11,}")
    v = doc["verdict"]
    emit(
        f"targets: {'met' if v['met'] else 'NOT met'} (points beaten: {len(v['points_beaten'])}, "
        f"pswpout <= 10 ms: {v['pswpout_le_10ms']}, refills <= 100 ms: {v['refills_le_100ms']})"
    )
