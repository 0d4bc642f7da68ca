"""Calibration: a ``blkback repro`` run simulated, and the two side by side.

:func:`load_repro` reads repro's results.json (or the directory holding it);
:func:`calibrate` simulates every configuration it ran with
:func:`~blkback.sim.scenario.scenario_from_repro` (the same sizing, parameters, cgroup limit and
guest schedule) and pairs each with the measured medians; :func:`write_outputs` writes
``calibration.json``, ``report.md`` and the plots ``swaps.png`` (pswpin/pswpout per
configuration) and ``pools.png`` (pool pages over time, the measured first run beside the
simulated one).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from blkback.sim.runner import Progress, run_many
from blkback.sim.scenario import (
    GUEST_JITTER_MS,
    HOG_SWEEPS_PER_S,
    REPORT_DELAY_MS,
    VMPRESSURE_WIN,
    scenario_from_repro,
)

MEASURED_KEYS = ("pswpin", "pswpout", "pool_pages_mean", "pool_pages_max", "squeezes")


def load_repro(path: Path) -> dict[str, Any]:
    """A repro results.json, given itself or the directory it is in."""
    file = path / "results.json" if path.is_dir() else path
    doc: dict[str, Any] = json.loads(file.read_text())
    if "configurations" not in doc or "config" not in doc:
        raise ValueError(f"{file}: not a blkback repro results.json with memory runs")
    return doc


def _pool_stats(samples: list[dict[str, Any]]) -> tuple[int, int]:
    if not samples:
        return 0, 0
    pools = [s["pool_pages"] for s in samples]
    return int(sum(pools) / len(pools)), int(max(pools))


def calibrate(
    doc: Mapping[str, Any],
    *,
    seed: int = 1,
    engine: str = "auto",
    scheduler: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    source: str = "",
) -> dict[str, Any]:
    """Simulate every configuration of the repro run; return the side-by-side document."""
    names = list(doc["configurations"])
    scenarios = [scenario_from_repro(doc, n, seed=seed) for n in names]
    results = run_many(
        [sc.to_dict() for sc in scenarios],
        engine=engine,
        scheduler=scheduler,
        workers=workers,
        progress=progress,
    )
    per: dict[str, Any] = {}
    for name, sc, res in zip(names, scenarios, results, strict=True):
        m = doc["configurations"][name]
        sim_samples = res.pop("samples", [])
        mean, peak = _pool_stats(sim_samples)
        runs = m.get("runs") or [{}]
        per[name] = {
            "label": doc["config"]["configurations"][name].get("label", name),
            "params": sc.params,
            "measured": {
                **{k: m.get(k) for k in MEASURED_KEYS},
                "pressure_reports": m.get("pressure_reports"),
                "runs": len(m.get("runs", [])),
                "runs_pswpout": [r.get("pswpout") for r in m.get("runs", [])],
            },
            "simulated": {
                "pswpin": res["pswpin"],
                "pswpout": res["pswpout"],
                "pool_pages_mean": mean,
                "pool_pages_max": peak,
                "squeezes": res["squeezes"],
                "pressure_reports": res["reports"],
            },
            "samples": {
                "measured": [
                    {"t": s["t"], "pool_pages": s["pool_pages"]} for s in runs[0].get("samples", [])
                ],
                "simulated": [{"t": s["t"], "pool_pages": s["pool_pages"]} for s in sim_samples],
            },
            "run": res,
            "scenario": sc.to_dict(),
        }
    cfg = doc["config"]
    return {
        "source": source,
        "repro": {
            "quick": cfg.get("quick"),
            "repeats": cfg.get("repeats"),
            "sizing": cfg.get("sizing"),
            "kernel": cfg.get("kernel"),
        },
        "constants": {
            "guest_jitter_ms": GUEST_JITTER_MS,
            "hog_sweeps_per_s": HOG_SWEEPS_PER_S,
            "report_delay_ms": REPORT_DELAY_MS,
            "vmpressure_win_pages": VMPRESSURE_WIN,
        },
        "configurations": per,
    }


def _ratio(sim: float, meas: float | None) -> str:
    if meas is None:
        return "-"
    if not meas:
        return "-" if not sim else "inf"
    return f"{sim / meas:.2f}"


def report_markdown(cal: Mapping[str, Any]) -> str:
    """The side-by-side tables."""
    rp = cal["repro"]
    sz = rp.get("sizing") or {}
    per = cal["configurations"]
    lines = [
        f"# Calibration: `blkback repro` {'--quick' if rp.get('quick') else '(full)'} "
        "beside `blkback sim`",
        "",
        f"Measured: `{cal['source']}` ({rp.get('repeats')} run(s) per configuration, medians; "
        f"kernel {rp.get('kernel')}). Simulated: `blkback sim calibrate`, one host per "
        "configuration built by `scenario_from_repro` from the same results.json: "
        f"{sz.get('devices')} rings, bursts of {int(sz.get('burst', 0)) >> 20} MiB every "
        f"{sz.get('period_s')} s, hog {sz.get('hog_mib')} MiB, slack {sz.get('slack_mib')} MiB, "
        f"{sz.get('seconds')} s.",
        "",
        "Fitted or guessed constants (not measured): guest burst jitter "
        f"{cal['constants']['guest_jitter_ms']} ms, hog rewrite rate "
        f"{cal['constants']['hog_sweeps_per_s']} sweeps/s, report delay "
        f"{cal['constants']['report_delay_ms']} ms, one report per "
        f"{cal['constants']['vmpressure_win_pages']} pages reclaimed; the volume's rate is the "
        "measured burst duration.",
        "",
        "## Swaps (pages)",
        "",
        "| configuration | measured pswpin | sim pswpin | measured pswpout | sim pswpout "
        "| sim/measured pswpout | measured runs pswpout |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, c in per.items():
        m, s = c["measured"], c["simulated"]
        runs = ", ".join(f"{x:,}" for x in m["runs_pswpout"] if x is not None)
        lines.append(
            f"| {name} ({c['label']}) | {m['pswpin']:,} | {s['pswpin']:,} | {m['pswpout']:,} | "
            f"{s['pswpout']:,} | {_ratio(s['pswpout'], m['pswpout'])} | {runs} |"
        )
    lines += [
        "",
        "## Pools and pressure",
        "",
        "| configuration | measured pools mean / max | sim pools mean / max | measured reports "
        "| sim reports | measured squeezes | sim squeezes |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, c in per.items():
        m, s = c["measured"], c["simulated"]
        lines.append(
            f"| {name} | {m['pool_pages_mean']:,} / {m['pool_pages_max']:,} | "
            f"{s['pool_pages_mean']:,} / {s['pool_pages_max']:,} | {m['pressure_reports']:,} | "
            f"{s['pressure_reports']:,} | {m['squeezes']:,} | {s['squeezes']:,} |"
        )
    lines += ["", "![swaps](swaps.png)", "", "![pools](pools.png)", ""]
    return "\n".join(lines)


def plot(cal: Mapping[str, Any], out: Path) -> list[Path]:
    """swaps.png and pools.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = cal["configurations"]
    names = list(per)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("pswpin", "pswpout"), strict=True):
        xs = range(len(names))
        ax.bar(
            [x - 0.2 for x in xs],
            [max(1, per[n]["measured"][key]) for n in names],
            0.4,
            label="measured",
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [max(1, per[n]["simulated"][key]) for n in names],
            0.4,
            label="simulated",
        )
        ax.set_xticks(list(xs), names, rotation=20)
        ax.set_yscale("log")
        ax.set_title(key)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "swaps.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)

    fig, axes = plt.subplots(len(names), 1, figsize=(10, 1.8 * len(names) + 1), sharex=True)
    axes_list = list(axes) if len(names) > 1 else [axes]
    for ax, n in zip(axes_list, names, strict=True):
        for kind, style in (("measured", "-"), ("simulated", "--")):
            s = per[n]["samples"][kind]
            ax.plot([x["t"] for x in s], [x["pool_pages"] for x in s], style, lw=1, label=kind)
        ax.set_ylabel(n, rotation=0, ha="right")
        ax.legend(fontsize=7, loc="upper right")
    axes_list[0].set_title("pool pages, all rings (measured: first run)")
    axes_list[-1].set_xlabel("seconds since the guests' first burst")
    fig.tight_layout()
    path = out / "pools.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
    return paths


def write_outputs(cal: dict[str, Any], out: Path, *, plots: bool = True) -> list[Path]:
    """calibration.json, report.md and (with ``plots``) the PNGs into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(cal, indent=1) + "\n")
    (out / "report.md").write_text(report_markdown(cal))
    written = [out / "calibration.json", out / "report.md"]
    if plots:
        written += plot(cal, out)
    return written


def summary(cal: Mapping[str, Any], emit: Any) -> None:
    """The swap table as plain text."""
    emit("configuration     meas pswpin   sim pswpin  meas pswpout  sim pswpout")
    for name, c in cal["configurations"].items():
        m, s = c["measured"], c["simulated"]
        emit(
            f"  {name:14s} {m['pswpin']:12,} {s['pswpin']:12,} {m['pswpout']:13,} "
            f"{s['pswpout']:12,}"
        )
