"""Turn a bench run into numbers people compare: medians, ratios, the price of the pool.

:func:`build_report` reduces every (server, workload) to the median over its successful repeats
and derives: blkback's ratio to the better nbdkit configuration of that cell, the overhead of
``max_buffer_pages=0`` and of a permanent squeeze relative to default blkback, pages allocated
per request, and whether a warm default pool still allocated during the measured window.
:func:`render_markdown` and :func:`write_png` present that dict; the dict itself is the JSON.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from blkback.bench.runner import BenchResults, CellResult
from blkback.bench.servers import NBDKIT_SERVERS, SERVERS
from blkback.bench.workloads import MIB, WORKLOADS

PRICE_VARIANTS: tuple[str, ...] = ("blkback-nopool", "blkback-squeeze")

#: Issue 12's bounds on the price of ``max_buffer_pages=0``: throughput lost, in percent,
#: by block size (4 KiB random cells, 1 MiB sequential cells).
NOPOOL_BOUND_PCT: dict[int, float] = {4 * 1024: 5.0, MIB: 10.0}


def _median(values: Iterable[float | int | None]) -> float | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.median(vals) if vals else None


def _summary(server: str, workload: str, cells: list[CellResult]) -> dict[str, Any]:
    ok = [c for c in cells if c.ok]
    fio = [c.fio for c in ok if c.fio is not None]
    return {
        "server": server,
        "workload": workload,
        "n_ok": len(ok),
        "n_failed": len(cells) - len(ok),
        "errors": [c.error for c in cells if c.error],
        "mb_s": _median(f["bw_bytes_per_s"] / 1e6 for f in fio),
        "iops": _median(f["iops"] for f in fio),
        "lat_mean_us": _median(f["lat_mean_ns"] / 1e3 for f in fio),
        "lat_p99_us": _median(f["lat_p99_ns"] / 1e3 for f in fio),
        "clat_mean_us": _median(f["clat_mean_ns"] / 1e3 for f in fio),
        "clat_p99_us": _median(f["clat_p99_ns"] / 1e3 for f in fio),
        "client_cpu_pct": _median(f["client_cpu_pct"] for f in fio),
        "host_busy_pct": _median(c.host_busy_pct for c in ok),
        "other_load_pct": _median(_other_load(c) for c in ok),
        "server_cpu_pct": _median(c.server_cpu_pct for c in ok),
        "server_us_per_op": _median(c.server_us_per_op for c in ok),
        "allocs_per_request": _median(c.allocs_per_request for c in ok),
        "pages_allocated_in_window": [c.pages_allocated for c in ok],
        "peak_pool_pages": _median(c.peak_pool_pages for c in ok),
        "squeezed": [c.squeezed for c in ok] if SERVERS[server].kind == "blkback" else None,
        "mb_s_all": [f["bw_bytes_per_s"] / 1e6 for f in fio],
    }


def _other_load(c: CellResult) -> float | None:
    """CPU used by neither the server nor fio during the window, in percent of one core."""
    if c.host_busy_pct is None or c.server_cpu_pct is None or c.fio is None:
        return None
    return max(0.0, c.host_busy_pct - c.server_cpu_pct - float(c.fio["client_cpu_pct"]))


def _pct(new: float | None, base: float | None) -> float | None:
    if new is None or base is None or base == 0:
        return None
    return (new / base - 1.0) * 100.0


def expected_cells(results: BenchResults) -> list[tuple[int, str, str]]:
    """Every (repeat, workload, server) the configuration asked for."""
    cfg = results.config
    return [(r, w, s) for r in range(cfg.repeat) for w, s in cfg.cells(r)]


def build_report(results: BenchResults) -> dict[str, Any]:
    """Medians, ratios, price and steady-state verdicts, plus the raw cells: JSON-ready."""
    cfg = results.config
    by_key: dict[tuple[str, str], list[CellResult]] = {}
    for c in results.cells:
        by_key.setdefault((c.server, c.workload), []).append(c)
    keys = sorted({(w, s) for _, w, s in expected_cells(results)}, key=_order_key)
    summary = {(s, w): _summary(s, w, by_key.get((s, w), [])) for w, s in keys}

    ratios = []
    for w in cfg.workloads:
        nbdkit = [summary[(s, w)] for s in NBDKIT_SERVERS if (s, w) in summary]
        nbdkit = [x for x in nbdkit if x["mb_s"] is not None]
        best = max(nbdkit, key=lambda x: x["mb_s"], default=None)
        blk = summary.get(("blkback", w))
        row: dict[str, Any] = {"workload": w, "best_nbdkit": best["server"] if best else None}
        row["blkback_mb_s"] = blk["mb_s"] if blk else None
        row["best_nbdkit_mb_s"] = best["mb_s"] if best else None
        row["throughput_ratio"] = (
            blk["mb_s"] / best["mb_s"] if blk and best and blk["mb_s"] is not None else None
        )
        b_us = blk["server_us_per_op"] if blk else None
        n_us = best["server_us_per_op"] if best else None
        row["blkback_us_per_op"] = b_us
        row["best_nbdkit_us_per_op"] = n_us
        row["cpu_per_op_ratio"] = b_us / n_us if b_us is not None and n_us else None
        row["cpu_per_op_ratio_per_repeat"] = (
            _ratios_per_repeat(by_key, w, best["server"], cfg.repeat) if blk and best else []
        )
        row["target_met"] = _targets_met(row)
        ratios.append(row)

    price = []
    for w in cfg.price_workloads:
        base = summary.get(("blkback", w))
        if base is None:
            continue
        for v in ("blkback", *PRICE_VARIANTS):
            cur = summary.get((v, w))
            if cur is None:
                continue
            change = _pct(cur["mb_s"], base["mb_s"])
            bound = NOPOOL_BOUND_PCT.get(WORKLOADS[w].bs_bytes) if v == "blkback-nopool" else None
            price.append(
                {
                    "workload": w,
                    "variant": v,
                    "bound_pct": bound,
                    "within_bound": None if bound is None or change is None else -change <= bound,
                    "mb_s": cur["mb_s"],
                    "server_us_per_op": cur["server_us_per_op"],
                    "throughput_change_pct": _pct(cur["mb_s"], base["mb_s"]),
                    "cpu_per_op_change_pct": _pct(
                        cur["server_us_per_op"], base["server_us_per_op"]
                    ),
                    "allocs_per_request": cur["allocs_per_request"],
                    "squeezed": cur["squeezed"],
                }
            )

    steady: dict[str, Any] = {"per_workload": {}, "warm_pool_allocates": None}
    for w in cfg.workloads:
        s = summary.get(("blkback", w))
        if s is None:
            continue
        allocs = [a for a in s["pages_allocated_in_window"] if a is not None]
        if allocs:
            steady["per_workload"][w] = allocs
    if steady["per_workload"]:
        steady["warm_pool_allocates"] = any(
            a > 0 for v in steady["per_workload"].values() for a in v
        )

    others = [x["other_load_pct"] for x in summary.values() if x["other_load_pct"] is not None]
    other_load = statistics.median(others) if others else None

    got = {(c.repeat, c.workload, c.server) for c in results.cells if c.ok}
    missing = [f"r{r} {w} {s}" for r, w, s in expected_cells(results) if (r, w, s) not in got]
    unsampled = [
        f"r{c.repeat} {c.workload} {c.server}"
        for c in results.cells
        if c.ok and c.server_us_per_op is None
    ]
    return {
        "config": results.to_dict()["config"],
        "environment": results.environment,
        "wall_s": results.wall_s,
        "complete": not missing and not unsampled,
        "other_load_pct": other_load,
        "missing_cells": missing,
        "unsampled_cells": unsampled,
        "summary": list(summary.values()),
        "ratios": ratios,
        "price": price,
        "steady_state": steady,
        "server_notes": results.server_notes,
        "cells": results.to_dict()["cells"],
    }


def _ratios_per_repeat(
    by_key: dict[tuple[str, str], list[CellResult]], workload: str, nbdkit: str, repeats: int
) -> list[float | None]:
    """blkback's CPU per op over ``nbdkit``'s, repeat by repeat (the two ran interleaved in
    each): how far the median's verdict is from noise. None where either cell has no figure."""

    def per_repeat(server: str) -> dict[int, float]:
        cells = by_key.get((server, workload), [])
        return {c.repeat: c.server_us_per_op for c in cells if c.ok and c.server_us_per_op}

    blk, ref = per_repeat("blkback"), per_repeat(nbdkit)
    return [blk[r] / ref[r] if r in blk and r in ref else None for r in range(repeats)]


def _targets_met(row: dict[str, Any]) -> bool | None:
    """Issue 12's per-cell target: CPU per op ≤ best nbdkit's and throughput ≥ it."""
    cpu, tput = row["cpu_per_op_ratio"], row["throughput_ratio"]
    if cpu is None or tput is None:
        return None
    return bool(cpu <= 1.0 and tput >= 1.0)


def _order_key(ws: tuple[str, str]) -> tuple[int, int]:
    w, s = ws
    return list(WORKLOADS).index(w), list(SERVERS).index(s)


def _f(v: float | None, fmt: str = "{:.0f}", none: str = "-") -> str:
    return none if v is None else fmt.format(v)


def _tput(w: str, row: dict[str, Any] | None) -> str:
    if row is None or row["mb_s"] is None:
        return "FAIL" if row is not None else "-"
    if WORKLOADS[w].bs_bytes >= MIB:
        return f"{row['mb_s']:.0f} MB/s"
    return f"{row['iops'] / 1e3:.1f}k IOPS"


#: Median CPU of other processes (percent of one core) above which the report warns.
OTHER_LOAD_WARN_PCT = 20.0


def _load_warning(other: float | None) -> list[str]:
    if other is None or other < OTHER_LOAD_WARN_PCT:
        return []
    return [
        f"**Warning: other processes used a median {other:.0f}% of a core during the cells**",
        "(host busy - server - fio). Absolute numbers are depressed and noisy; the interleaving",
        "spreads that load over all servers, so ratios and µs/op are the figures to read.",
        "",
    ]


def _yes_no(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "**no**")


def _headline(report: dict[str, Any]) -> list[str]:
    """Server CPU per op against the best nbdkit, cell by cell: the figure to beat."""
    lines = [
        "## Headline: server CPU per op, blkback / best nbdkit",
        "",
        "Per cell, the nbdkit configuration with the higher throughput is the one to beat.",
        "Target (issue 12): CPU ratio ≤ 1.00 and throughput ratio ≥ 1.00 on every cell.",
        "",
        "| workload | blkback µs/op | best nbdkit µs/op | **CPU ratio** | CPU ratio per repeat "
        "| throughput ratio | both met |",
        "|---|---|---|---|---|---|---|",
    ]
    lines.extend(
        f"| {r['workload']} | {_f(r.get('blkback_us_per_op'), '{:.1f}')} | "
        f"{_f(r.get('best_nbdkit_us_per_op'), '{:.1f}')} ({r.get('best_nbdkit') or '-'}) | "
        f"**{_f(r.get('cpu_per_op_ratio'), '{:.2f}')}** | "
        f"{' / '.join(_f(x, '{:.2f}') for x in r.get('cpu_per_op_ratio_per_repeat', [])) or '-'} | "
        f"{_f(r.get('throughput_ratio'), '{:.2f}')} | {_yes_no(r.get('target_met'))} |"
        for r in report["ratios"]
    )
    nopool = [p for p in report["price"] if p.get("bound_pct") is not None]
    if nopool:
        lines += [
            "",
            "Price of `max_buffer_pages=0` (throughput lost against default blkback in the "
            "same run; bound: 5 % at 4 KiB, 10 % at 1 MiB):",
            "",
            "| workload | Δ throughput | bound | within |",
            "|---|---|---|---|",
        ]
        lines.extend(
            f"| {p['workload']} | {_f(p['throughput_change_pct'], '{:+.1f}%')} | "
            f"-{p['bound_pct']:.0f}% | {_yes_no(p['within_bound'])} |"
            for p in nopool
        )
    return [*lines, ""]


def render_markdown(report: dict[str, Any]) -> str:
    """The human report (report.md)."""
    cfg, env = report["config"], report["environment"]
    summary = {(r["server"], r["workload"]): r for r in report["summary"]}
    main_servers = [s for s in cfg["servers"] if not SERVERS[s].price_only]
    lines = ["# blkback bench", ""]
    lines += [
        f"- {env.get('date', '?')}, host: {env.get('cpus', '?')} CPUs "
        f"({env.get('cpu_model', '?')}), kernel {env.get('kernel', '?')}, "
        f"Python {env.get('python', '?')}",
        f"- tools: {'; '.join(f'{k} {v}' for k, v in env.get('tools', {}).items())}",
        f"- {cfg['repeat']} repeat(s), fio runtime {cfg['runtime_s']:g} s after a "
        f"{cfg['ramp_s']:g} s ramp, fio region {cfg['size_bytes'] / MIB:.0f} MiB of a "
        f"{cfg['export_size_bytes'] / MIB:.0f} MiB export, Unix sockets"
        + (", **--quick** (smoke run, not a measurement)" if cfg["quick"] else ""),
        f"- wall time {report['wall_s']:.0f} s; complete: {'yes' if report['complete'] else 'NO'}"
        f"; load average before {env.get('loadavg_before', '?')}, "
        f"after {env.get('loadavg_after', '?')}",
        "",
        "Every figure is the median over repeats. fio and the server share the machine's cores,",
        "so the 4k QD16 cells are bounded by total CPU: compare servers on server µs/op there.",
        "",
        *_load_warning(report.get("other_load_pct")),
        *_headline(report),
        "## Throughput (median)",
        "",
    ]
    head = ["workload", *main_servers, "blkback / best nbdkit", "µs/op ratio"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios = {r["workload"]: r for r in report["ratios"]}
    for w in cfg["workloads"]:
        cells = [_tput(w, summary.get((s, w))) for s in main_servers]
        r = ratios.get(w, {})
        best = f" ({r['best_nbdkit']})" if r.get("best_nbdkit") else ""
        ratio = _f(r.get("throughput_ratio"), "{:.2f}") + (
            best if r.get("throughput_ratio") else ""
        )
        lines.append(
            f"| {w} | "
            + " | ".join(cells)
            + f" | {ratio} | {_f(r.get('cpu_per_op_ratio'), '{:.2f}')} |"
        )
    lines += [
        "",
        "## Detail (median)",
        "",
        "Latency is fio's `lat_ns` (submission to completion). Server CPU is utime+stime of the",
        "server process over the sampled window inside fio's measured window; 100% = one core.",
        "Others CPU % = whole machine busy (/proc/stat) in the same window - server - fio, in",
        "units of one core: load from processes outside the bench.",
        "",
        "| workload | server | MB/s | IOPS | lat mean µs | lat p99 µs | server CPU % | "
        "server µs/op | fio CPU % | others CPU % | runs ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["summary"]:
        lines.append(
            f"| {row['workload']} | {row['server']} | {_f(row['mb_s'])} | {_f(row['iops'])} | "
            f"{_f(row['lat_mean_us'], '{:.1f}')} | {_f(row['lat_p99_us'], '{:.1f}')} | "
            f"{_f(row['server_cpu_pct'])} | {_f(row['server_us_per_op'], '{:.1f}')} | "
            f"{_f(row['client_cpu_pct'])} | {_f(row['other_load_pct'])} | "
            f"{row['n_ok']}/{row['n_ok'] + row['n_failed']} |"
        )
    lines += ["", "## Price of the pool and of squeezing", ""]
    if report["price"]:
        lines += [
            "Change relative to default blkback (`max_buffer_pages=1024`) in the same run.",
            "`blkback-nopool`: `max_buffer_pages=0`; `blkback-squeeze`: "
            "`buffer_squeeze_duration_ms=4294967295` plus one `ctl pressure` (pool target 0 for",
            "the whole run). Pages allocated per request come from `ctl stats` over the window.",
            "",
            "| workload | variant | MB/s | Δ throughput | server µs/op | Δ µs/op | "
            "pages allocated / request | squeezed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in report["price"]:
            sq = p["squeezed"]
            sq_txt = "-" if not sq else ("yes" if all(sq) else "partly" if any(sq) else "no")
            lines.append(
                f"| {p['workload']} | {p['variant']} | {_f(p['mb_s'])} | "
                f"{_f(p['throughput_change_pct'], '{:+.1f}%')} | "
                f"{_f(p['server_us_per_op'], '{:.1f}')} | "
                f"{_f(p['cpu_per_op_change_pct'], '{:+.1f}%')} | "
                f"{_f(p['allocs_per_request'], '{:.3f}')} | {sq_txt} |"
            )
    else:
        lines.append("Not measured (blkback not among the servers).")
    lines += ["", "## Steady state of a warm pool (default params)", ""]
    st = report["steady_state"]
    if st["warm_pool_allocates"] is None:
        lines.append("Not measured (blkback not among the servers).")
    else:
        counts = [a for v in st["per_workload"].values() for a in v]
        hit = [a for a in counts if a > 0]
        verdict = (
            f"yes: {sum(hit)} page(s) in {len(hit)} of {len(counts)} cells"
            if hit
            else f"no: 0 pages in all {len(counts)} cells"
        )
        lines.append(f"Pages allocated inside the measured window (after the ramp): {verdict}.")
        lines.append("")
        lines.append("| workload | pages allocated per repeat |")
        lines.append("|---|---|")
        for w, v in st["per_workload"].items():
            lines.append(f"| {w} | {', '.join(str(x) for x in v)} |")
    lines += ["", "## Method", ""]
    lines += [
        "- Servers: " + "; ".join(f"`{s}`: {SERVERS[s].description}" for s in cfg["servers"]),
        "- Each repeat starts every server afresh, writes the fio region once (1 MiB QD16), then",
        "  runs each workload on every server in turn (interleaved); the server order rotates by",
        "  one per repeat. The price variants run only the QD16 cells listed in the price table.",
        "- Server CPU (`/proc/PID/stat`) and blkback's `ctl stats` (read in-process from the",
        "  control socket) are sampled 0.25 s after the ramp and 0.15 s before fio ends.",
        "  Requests per window = rd+wr+f+ds+other of every ring.",
        "- blkback runs with `--pressure off`: host signals never squeeze it; only the",
        "  `blkback-squeeze` variant is squeezed, by one manual `blkback ctl pressure`.",
        "- The qemu-nbd image is a `posix_fallocate`d file in "
        f"{cfg['tmpfs_dir']}, removed afterwards.",
    ]
    problems = [r for r in report["summary"] if r["n_failed"]]
    if problems or report["missing_cells"] or any(report["server_notes"].values()):
        lines += ["", "## Problems", ""]
        for r in problems:
            first = (r["errors"][0] or "").splitlines()[0] if r["errors"] else "?"
            lines.append(f"- {r['workload']} {r['server']}: {r['n_failed']} failed: {first}")
        for m in report["missing_cells"]:
            lines.append(f"- missing: {m}")
        for s, notes in report["server_notes"].items():
            lines.extend(f"- {s}: {n}" for n in notes)
    return "\n".join(lines) + "\n"


def write_png(report: dict[str, Any], path: Path) -> None:
    """Grouped bar chart: MB/s of the 1 MiB cells and kIOPS of the 4 KiB cells, per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report["config"]
    summary = {(r["server"], r["workload"]): r for r in report["summary"]}
    servers = list(cfg["servers"])
    groups = [
        ([w for w in cfg["workloads"] if WORKLOADS[w].bs_bytes >= MIB], "MB/s", 1.0, "mb_s"),
        ([w for w in cfg["workloads"] if WORKLOADS[w].bs_bytes < MIB], "kIOPS", 1e-3, "iops"),
    ]
    groups = [g for g in groups if g[0]]
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 4.2 * len(groups)), squeeze=False)
    width = 0.8 / max(len(servers), 1)
    for ax, (wls, unit, scale, key) in zip(axes[:, 0], groups, strict=True):
        for i, s in enumerate(servers):
            xs, ys, lo, hi = [], [], [], []
            for j, w in enumerate(wls):
                row = summary.get((s, w))
                if row is None or row[key] is None:
                    continue
                med = row[key] * scale
                per = [
                    v * scale * (1.0 if key == "mb_s" else 1e6 / WORKLOADS[w].bs_bytes)
                    for v in row["mb_s_all"]
                ]
                xs.append(j + (i - (len(servers) - 1) / 2) * width)
                ys.append(med)
                lo.append(max(med - min(per), 0.0) if per else 0.0)
                hi.append(max(max(per) - med, 0.0) if per else 0.0)
            if xs:
                ax.bar(xs, ys, width, label=s, yerr=[lo, hi], capsize=2)
        ax.set_xticks(range(len(wls)), wls)
        ax.set_ylabel(f"{unit} (median, bars: min-max)")
        ax.legend(fontsize="small", ncols=3)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"blkback bench: {cfg['repeat']} repeat(s), {cfg['runtime_s']:g} s per cell"
        + (" (quick)" if cfg["quick"] else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
