"""The seed mail's three experiments on a simulated Xen host, and their report.

1. Memory pressure: swaps in dom0 with Linux 5.4 (``before``: no shrinker) and with the seed
   patch (``after``: global deadline, lazy squeeze, 10 ms).
2. Squeeze duration: the same with 1, 10 and 100 ms.
3. Overhead: the seed's dd loop on one disk with ``max_buffer_pages`` 1024 and 0, on the seed's
   slow network volume and, beyond the seed, on a fast volume.

``results.json`` has the schema shared with ``blkback repro``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blkback.sim.runner import Progress, run_many
from blkback.sim.scenario import Scenario, seed_overhead, seed_pressure, seed_pressure_busy

SEED_PRESSURE = {"before": (76_672, 185_799), "after": (212, 3_325)}
SEED_DURATION = {"1": (852, 6_424), "10": (212, 3_325), "100": (203, 3_340)}
SEED_DD = {
    "1024": [45.8, 38.7, 38.7, 38.7, 38.7],
    "0": [45.8, 38.7, 38.7, 38.7, 38.7],
}
DURATIONS = ("1", "10", "100")
MBPS = ("1024", "0")
VOLUMES = ("slow", "fast")


BUSY = (("before", "10"), ("after", "1"), ("after", "10"), ("after", "100"))
EXTRAS = (("5.6", "10"), ("wake", "1"), ("wake", "10"), ("wake", "100"), ("graded", "10"))


def seed_scenarios(
    *, seed: int = 1, sim_seconds: float = 60.0, extras: bool = True
) -> dict[str, Scenario]:
    """Every host run the three experiments need, by key."""
    out: dict[str, Scenario] = {}
    before = seed_pressure("before", seed=seed)
    before.duration_s = sim_seconds
    out["pressure/before"] = before
    for d in DURATIONS:
        sc = seed_pressure("after", duration_ms=int(d), seed=seed)
        sc.duration_s = sim_seconds
        out[f"duration/{d}"] = sc
    for vol in VOLUMES:
        for m in MBPS:
            out[f"overhead/{vol}/{m}"] = seed_overhead(int(m), volume=vol, seed=seed)
    if extras:
        for variant, d in EXTRAS:
            sc = seed_pressure(variant, duration_ms=int(d), seed=seed)
            sc.duration_s = sim_seconds
            out[f"extra/{variant}/{d}"] = sc
        for variant, d in BUSY:
            sc = seed_pressure_busy(variant, duration_ms=int(d), seed=seed)
            sc.duration_s = min(sc.duration_s, sim_seconds)
            out[f"busy/{variant}/{d}"] = sc
    return out


def run_seed(
    *,
    seed: int = 1,
    sim_seconds: float = 60.0,
    engine: str = "auto",
    scheduler: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    extras: bool = True,
) -> dict[str, Any]:
    """Run the experiments (and, with ``extras``, 5.6 and blkback's variants on the same host);
    return the results.json document."""
    scenarios = seed_scenarios(seed=seed, sim_seconds=sim_seconds, extras=extras)
    keys = list(scenarios)
    results = run_many(
        [scenarios[k].to_dict() for k in keys],
        engine=engine,
        scheduler=scheduler,
        workers=workers,
        progress=progress,
    )
    by = dict(zip(keys, results, strict=True))
    return assemble(by, scenarios)


def _swaps(r: dict[str, Any]) -> dict[str, int]:
    return {"pswpin": int(r["pswpin"]), "pswpout": int(r["pswpout"])}


def assemble(by: dict[str, dict[str, Any]], scenarios: dict[str, Scenario]) -> dict[str, Any]:
    """Build the results.json document from the runs."""
    return {
        "memory_pressure": {
            "before": _swaps(by["pressure/before"]),
            "after": _swaps(by["duration/10"]),
        },
        "duration_sweep": {d: _swaps(by[f"duration/{d}"]) for d in DURATIONS},
        "overhead": {
            vol: {m: [round(x, 2) for x in by[f"overhead/{vol}/{m}"]["dd_mbps"]] for m in MBPS}
            for vol in VOLUMES
        },
        "config": {
            "source": "sim",
            "scenarios": {k: sc.to_dict() for k, sc in scenarios.items()},
            "runs": by,
        },
    }


def _ratio(a: float, b: float) -> str:
    return f"{a / b:,.0f}x" if b else "inf"


def report_markdown(doc: dict[str, Any]) -> str:
    """The report: the seed's tables with the simulated numbers beside them."""
    mp = doc["memory_pressure"]
    ds = doc["duration_sweep"]
    ov = doc["overhead"]
    runs = doc["config"]["runs"]
    before = runs["pressure/before"]
    lines = [
        "# The seed's experiments on a simulated Xen host",
        "",
        f"Simulated with `blkback sim seed`: {before['devices']} virtual disks (10 VMs x 10), "
        f"{before['sim_seconds']:.0f} simulated seconds per run, dom0 with "
        f"{doc['config']['scenarios']['pressure/before']['host']['ram_mib']} MiB RAM. "
        "The backend is blkback's core (Bus, Device, Ring, PagePool, Params, KernelPolicy) on a "
        "virtual clock; the host's reclaim, swap and guests are models (see "
        "`src/blkback/sim/`). Seed numbers are from the seed mail (real hardware, unknown "
        "duration and sizes), so compare shapes, not values.",
        "",
        "## 1. Memory pressure (pswpin / pswpout in dom0)",
        "",
        "| | seed pswpin | seed pswpout | sim pswpin | sim pswpout |",
        "|---|---:|---:|---:|---:|",
    ]
    for k in ("before", "after"):
        s_in, s_out = SEED_PRESSURE[k]
        lines.append(f"| {k} | {s_in:,} | {s_out:,} | {mp[k]['pswpin']:,} | {mp[k]['pswpout']:,} |")
    lines += [
        "",
        "Reduction of pswpout: seed "
        f"{_ratio(SEED_PRESSURE['before'][1], SEED_PRESSURE['after'][1])}, sim "
        f"{_ratio(mp['before']['pswpout'], max(1, mp['after']['pswpout']))}.",
        "",
        "## 2. Squeeze duration (seed patch: global deadline, lazy squeeze)",
        "",
        "| duration (ms) | seed pswpin | seed pswpout | sim pswpin | sim pswpout "
        "| sim shrinker calls |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for d in DURATIONS:
        s_in, s_out = SEED_DURATION[d]
        r = runs[f"duration/{d}"]
        lines.append(
            f"| {d} | {s_in:,} | {s_out:,} | {ds[d]['pswpin']:,} | {ds[d]['pswpout']:,} | "
            f"{r['shrinker_calls']:,} |"
        )
    lines += [
        "",
        "## 3. dd overhead (MB/s per run of `dd bs=4k count=131072; sync`)",
        "",
        "| volume | max_buffer_pages | seed | sim | pages allocated |",
        "|---|---:|---|---|---:|",
    ]
    for vol in VOLUMES:
        for m in MBPS:
            seed_col = ", ".join(f"{x}" for x in SEED_DD[m]) if vol == "slow" else "(not in seed)"
            sim_col = ", ".join(f"{x:.1f}" for x in ov[vol][m])
            alloc = runs[f"overhead/{vol}/{m}"]["pages_allocated"]
            lines.append(f"| {vol} | {m} | {seed_col} | {sim_col} | {alloc:,} |")
    extra = [(v, d) for v, d in EXTRAS if f"extra/{v}/{d}" in runs]
    if extra:
        lines += [
            "",
            "## Beyond the seed: the same host with 5.6 and with blkback's variants",
            "",
            "5.6 = per-device deadline, lazy; wake = 5.6 plus an immediate loop pass on every "
            "ring of a squeezed device; graded = wake with the graded policy.",
            "",
            "| variant | duration (ms) | pswpin | pswpout | pages squeezed | wake passes |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for v, d in extra:
            r = runs[f"extra/{v}/{d}"]
            lines.append(
                f"| {v} | {d} | {r['pswpin']:,} | {r['pswpout']:,} | {r['pages_squeezed']:,} | "
                f"{r['wake_passes']:,} |"
            )
    busy = [(v, d) for v, d in BUSY if f"busy/{v}/{d}" in runs]
    if busy:
        lines += [
            "",
            "## Beyond the seed: pools on busy rings",
            "",
            "A smaller host (30 disks, 560 MiB dom0, 20 s) whose disks write 0.5 MB bursts with "
            "10 ms mean gaps and no background I/O (seed patch: global, lazy).",
            "",
            "| variant | duration (ms) | pswpin | pswpout |",
            "|---|---:|---:|---:|",
        ]
        for v, d in busy:
            r = runs[f"busy/{v}/{d}"]
            lines.append(f"| {v} | {d} | {r['pswpin']:,} | {r['pswpout']:,} |")
    lines += ["", "## Where and why the numbers differ", "", *DIFFERENCES, ""]
    return "\n".join(lines)


DIFFERENCES = [
    "- **Absolute counts.** The seed does not give the host's RAM, the number of devices, "
    "the workload or the test length. The sim's host (2 GiB dom0, 100 disks, 60 s) is a "
    "guess, tuned so that 'before' thrashes in the same order of magnitude as the seed. Each "
    "disk writes bursts (48 MB mean, 4 s mean gaps) and also serves 200 IOPS of random "
    "4-128 KiB I/O throughout (a guess, not fitted: the random workload's default rate). "
    "Compare ratios and orderings, not values.",
    "- **Before/after.** The shape matches: with the squeeze there are far fewer swaps. The "
    "sim's 'after' (10 ms) swaps nothing at all, the seed's still 3,325 pages: the sim has "
    "no other source of swap-outs once the pools are squeezed (reclaim scanning before the "
    "first report, other dom0 memory growth).",
    "- **5.6 = seed here.** Every report reaches every device at the same instant, so the "
    "per-device deadlines all equal the single global one. They would differ only for "
    "devices skipped by the report (reclaim_sem held) or added later.",
    "- **The knee at 10 ms.** 1 ms swaps out more than 10 ms, and 100 ms gains nothing over "
    "10 ms, as in the seed, because every ring runs a loop pass every few ms (the background "
    "I/O): a 10 ms window catches every ring holding a free pool, a 1 ms one only those "
    "passing inside it (or during the reclaim episode, which refreshes the deadline). "
    "Without the background I/O the rings idle between bursts, pass only every 100 ms, and "
    "100 ms keeps winning (30 s: 17,851 / 7,727 / 0). The 1 ms excess depends on how often "
    "rings pass: with 2 ms I/O batching instead of 5 ms even 1 ms swaps nothing, and at "
    "50 IOPS 10 ms still leaves a few hundred pages (docs/sim/calibration/README.md). "
    "'Beyond the seed' shows that waking the rings removes the dependence on the duration.",
    "- **pswpin.** dom0 processes touch their cold pages rarely (5 pages/s each), so pages "
    "swapped out in a short episode seldom come back. The pswpin/pswpout ratio follows "
    "directly from this access model.",
    "- **dd runs.** The seed's first run (45.8 MB/s, then 38.7) is reproduced with a fitted "
    "initial burst credit of the volume: 90 MB at 400 MB/s. This is a fit, not a known "
    "mechanism. With max_buffer_pages=0 there is no loss on either volume, even the 2 GB/s "
    "one. The kernel maps the next batch before it shrinks, so pages returned since the last "
    "pass are reused and only the surplus is freed (see 'pages allocated'). The few extra "
    "allocations cost microseconds, small beside a 128 KiB transfer.",
    "- **Not modelled:** persistent grants (up to 1056 more pinned pages per ring), reclaim "
    "stalls delaying guest I/O, NUMA, memcg, file refaults, swap readahead, kswapd's "
    "watermark boosting.",
]


def plot_seed(doc: dict[str, Any], out: Path) -> list[Path]:
    """PNG plots of the three experiments, seed beside sim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    mp = doc["memory_pressure"]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = ["seed before", "sim before", "seed after", "sim after"]
    pin = [
        SEED_PRESSURE["before"][0],
        mp["before"]["pswpin"],
        SEED_PRESSURE["after"][0],
        mp["after"]["pswpin"],
    ]
    pout = [
        SEED_PRESSURE["before"][1],
        mp["before"]["pswpout"],
        SEED_PRESSURE["after"][1],
        mp["after"]["pswpout"],
    ]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [max(v, 1) for v in pin], 0.4, label="pswpin")
    ax.bar([x + 0.2 for x in xs], [max(v, 1) for v in pout], 0.4, label="pswpout")
    ax.set_xticks(list(xs), labels)
    ax.set_yscale("log")
    ax.set_ylabel("pages")
    ax.set_title("Memory pressure: swaps in dom0")
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, out / "memory_pressure.png", plt))

    ds = doc["duration_sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    d = [int(k) for k in DURATIONS]
    ax.plot(d, [SEED_DURATION[k][1] for k in DURATIONS], "o--", label="seed pswpout")
    ax.plot(d, [max(ds[k]["pswpout"], 1) for k in DURATIONS], "o-", label="sim pswpout")
    ax.plot(d, [SEED_DURATION[k][0] for k in DURATIONS], "s--", label="seed pswpin")
    ax.plot(d, [max(ds[k]["pswpin"], 1) for k in DURATIONS], "s-", label="sim pswpin")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("squeeze duration (ms)")
    ax.set_ylabel("pages")
    ax.set_title("Squeeze duration sweep")
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, out / "duration_sweep.png", plt))

    ov = doc["overhead"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, vol in zip(axes, VOLUMES, strict=True):
        for m, style in zip(MBPS, ("o-", "x--"), strict=True):
            ax.plot(range(1, len(ov[vol][m]) + 1), ov[vol][m], style, label=f"sim mbp={m}")
        if vol == "slow":
            ax.plot(range(1, 6), SEED_DD["1024"], "k:", label="seed (both)")
        ax.set_title(f"dd on the {vol} volume")
        ax.set_xlabel("run")
        ax.set_ylabel("MB/s")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, out / "overhead.png", plt))
    return paths


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(doc: dict[str, Any], out: Path, *, plots: bool = True) -> list[Path]:
    """Write results.json, report.md and the plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "report.md"]
    (out / "results.json").write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    (out / "report.md").write_text(report_markdown(doc))
    if plots:
        written += plot_seed(doc, out)
    return written


def summary(doc: dict[str, Any], emit: Callable[[str], None]) -> None:
    """The three tables as plain text, seed beside sim."""
    mp, ds, ov = doc["memory_pressure"], doc["duration_sweep"], doc["overhead"]
    emit("memory pressure        seed pswpin  seed pswpout    sim pswpin   sim pswpout")
    for k in ("before", "after"):
        s = SEED_PRESSURE[k]
        emit(f"  {k:20s} {s[0]:11,} {s[1]:13,} {mp[k]['pswpin']:13,} {mp[k]['pswpout']:13,}")
    emit("squeeze duration (ms)  seed pswpin  seed pswpout    sim pswpin   sim pswpout")
    for d in DURATIONS:
        s = SEED_DURATION[d]
        emit(f"  {d:20s} {s[0]:11,} {s[1]:13,} {ds[d]['pswpin']:13,} {ds[d]['pswpout']:13,}")
    emit("dd MB/s per run        max_buffer_pages=1024          max_buffer_pages=0")
    emit(f"  {'seed (slow)':20s} {_runs(SEED_DD['1024']):30s} {_runs(SEED_DD['0'])}")
    for vol in VOLUMES:
        emit(f"  {'sim ' + vol:20s} {_runs(ov[vol]['1024']):30s} {_runs(ov[vol]['0'])}")


def _runs(v: list[float]) -> str:
    return " ".join(f"{x:.1f}" for x in v)
