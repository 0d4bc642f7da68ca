"""report.md and the PNG plots from the results dict (see :mod:`blkback.repro.runner`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIB = 1 << 20


def _n(x: float | int | None) -> str:
    if x is None:
        return "-"
    return f"{round(x):,}"


def _pct(x: float) -> str:
    return f"{x:+.1f}%"


def _range(s: dict[str, float]) -> str:
    return f"{_n(s['min'])}-{_n(s['max'])}"


def write_report(results: dict[str, Any], path: Path) -> None:
    """Write the Markdown report."""
    cfg = results["config"]
    sz = cfg["sizing"]
    seed = cfg["seed"]
    quick = cfg["quick"]
    out: list[str] = []
    add = out.append
    add("# blkback repro: the xen-blkback squeeze, reproduced on real memory pressure")
    add("")
    add(
        f"Mode: **{'quick' if quick else 'full'}**, experiment `{cfg['experiment']}`, "
        f"{cfg['repeats']} run(s) per configuration, kernel {cfg['kernel']}, "
        f"{cfg['cpus']} CPUs, Python {cfg['python']}; took {results['elapsed_s'] / 60:.1f} min."
    )
    if quick:
        add("")
        add(
            "_Quick mode: one short run per configuration and a short dd loop. The numbers "
            "show the mechanism, not the full result; see the full run for the claims._"
        )
    add("")
    per = results.get("configurations", {})
    if per:
        add("## Test bed")
        add("")
        run0 = next(iter(per.values()))["runs"][0]["sizes"]
        add(
            f"- dom0: a cgroup v1 memory child, limit L = baseline + hog + slack = "
            f"{run0['baseline_bytes'] / MIB:.0f} + {sz['hog_mib']} + {sz['slack_mib']} = "
            f"{run0['limit_bytes'] / MIB:.0f} MiB, swap allowed (memsw unlimited, swappiness 60);"
            f" swap: {_swap_text(cfg)}."
        )
        add(
            "- In dom0: `blkback serve` (it joins the cgroup before it starts, so its pressure "
            "monitor listens to this cgroup's vmpressure, plus PSI) and a hog of "
            f"{sz['hog_mib']} MiB of anonymous memory that it keeps touching."
        )
        add(_guests_text(cfg, per))
        add(
            f"- Sizing: idle pools retain P = rings x 1024 pages = {sz['pools_mib']:.0f} MiB "
            f"> slack = {sz['slack_mib']} MiB, so without the squeeze the pools push dom0 "
            "over its limit and it swaps; with the squeeze each pressure event frees them."
        )
        add(
            f"- Each run: fresh cgroup, server, hog and guests; {sz['seconds']:g} s measured "
            "from the guests' first burst; pswpin/pswpout are /proc/vmstat deltas (host-wide, "
            "as the seed measured dom0); the cgroup's own memory.stat deltas (major faults, "
            "anon refaults) corroborate them. Pools, RSS, cgroup usage/swap and pressure "
            f"events sampled every {sz['sample_ms']} ms through the control socket."
        )
        add("")
    mp = results.get("memory_pressure")
    if mp:
        add("## 1. Memory pressure test")
        add("")
        add(
            "| | seed pswpin | seed pswpout | ours pswpin | ours pswpout | "
            "ours swpout_zero / swpin_zero | "
            "dom0's own anon refaults | dom0's own major faults | runs pswpin / pswpout |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for key, name in (("before", "off"), ("after", "10")):
            s = seed["memory_pressure"][key]
            o = per[name]
            add(
                f"| {key} ({CONF_LABEL[name]}) | {_n(s['pswpin'])} | {_n(s['pswpout'])} | "
                f"{_n(o['pswpin'])} | {_n(o['pswpout'])} | {_zero(o)} | "
                f"{_n(o['cgroup']['workingset_refault_anon'])} | "
                f"{_n(o['cgroup']['pgmajfault'])} | {_runs(o)} |"
            )
        sr = seed["memory_pressure"]
        cr = mp.get("cgroup_ratio", {})
        cg_after = mp.get("cgroup", {}).get("after", {})
        own = [
            _ratio(cr.get(k, 0), cg_after.get(k, 1))
            for k in ("workingset_refault_anon", "pgmajfault")
        ]
        add(
            f"| **reduction** | {sr['before']['pswpin'] / sr['after']['pswpin']:.0f}x | "
            f"{sr['before']['pswpout'] / sr['after']['pswpout']:.0f}x | "
            f"**{_ratio(mp['ratio']['pswpin'], mp['after']['pswpin'])}** | "
            f"**{_ratio(mp['ratio']['pswpout'], mp['after']['pswpout'])}** | | "
            f"{own[0]} | {own[1]} | |"
        )
        add("")
        add(
            "pswpin/pswpout: /proc/vmstat deltas, host-wide as in the seed; medians over the "
            "runs that other tenants did not pollute (marked `*` in the runs column: host "
            "pswpin > 1.5 x dom0's own anon refaults + 2,000, i.e. someone else swapped during "
            "the run; this shared host runs other test suites, some with their own memory "
            "hogs and swap). dom0's own counters come from the cgroup's memory.stat and no "
            "other process can add to them: anon refaults are the pages dom0 read back from "
            "swap (= pswpin when dom0 swaps alone), major faults count faults, not pages; "
            "v1 memory.stat has no swap-out counter. Medians over all runs."
        )
        add("")
        add(ZERO_PAGES_TEXT)
        add("")
        add(
            "Per configuration (pswpin/pswpout: medians over unpolluted runs; the cgroup's "
            "own columns and the rest: medians over all runs):"
        )
        add("")
        add(
            _config_table(per, [n for n in ("off", "10", "wake-off", "graded", "auto") if n in per])
        )
        add("")
    ds = results.get("duration_sweep")
    if ds:
        add("## 2. Squeeze duration sweep")
        add("")
        add(
            "| duration | seed pswpin | seed pswpout | ours pswpin | ours pswpout | "
            "ours range pswpin | ours range pswpout |"
        )
        add("|---:|---:|---:|---:|---:|---|---|")
        for d in ("1", "10", "100"):
            s = seed["duration_sweep"][d]
            o = ds[d]
            add(
                f"| {d} ms | {_n(s['pswpin'])} | {_n(s['pswpout'])} | {_n(o['pswpin'])} | "
                f"{_n(o['pswpout'])} | {_range(o['spread']['pswpin'])} | "
                f"{_range(o['spread']['pswpout'])} |"
            )
        add("")
        add(_config_table(per, ["1", "10", "100"]))
        add("")
    dk = results.get("duration_sweep_kernel")
    if ds and dk:
        add(_kernel_sweep_text(seed, ds, dk, per))
    if mp and mp.get("beyond"):
        add("## 4. Beyond the seed: lazy squeeze, graded and auto policies")
        add("")
        add("| configuration | pswpin | pswpout | squeezes | pages squeezed | pools mean |")
        add("|---|---:|---:|---:|---:|---:|")
        for n in ("off", "10", "wake-off", "graded", "auto"):
            if n in per:
                o = per[n]
                add(
                    f"| {CONF_LABEL[n]} | {_n(o['pswpin'])} | {_n(o['pswpout'])} | "
                    f"{_n(o['squeezes'])} | {_n(o['pages_squeezed'])} | "
                    f"{_n(o['pool_pages_mean'])} |"
                )
        add("")
    ov = results.get("overhead")
    if ov:
        in_vm = ov.get("where") == "vm"
        where = (
            "inside a VM guest, on its virtio disk served by blkback"
            if in_vm
            else "over nbdfuse + loop"
        )
        add(f"## 3. Performance overhead (dd on ext4 {where})")
        add("")
        add(
            "The seed's loop, `for i in {1..N}; do dd if=/dev/zero of=file bs=4k "
            f"count=...; sync; done`, here `{cfg['overhead']['dd']}` x "
            f"{cfg['overhead']['runs']}. MB/s = bytes / (dd + sync)"
            + (
                " by the guest's clock. The guest (one VM, 256 MiB, its ext4 made by its own "
                "mke2fs on a `memory:1G` export through QEMU's NBD client and virtio-blk) runs "
                "coreutils' dd, so its lines below are the guest's own, printed as the seed's "
                "guest printed them; `max_buffer_pages` is set on the host through "
                "`blkback ctl` between the loops."
                if in_vm
                else ": dd alone only copies into this host's large page cache (its own figure "
                "is kept in results.json and in the log below); the sync is what reaches the "
                "volume."
            )
        )
        add("")
        add("| volume | max_buffer_pages | MB/s per run | median | vs 1024 |")
        add("|---|---:|---|---:|---:|")
        for kind, what in (("slow", "~40 MB/s (memory, rate=40M)"), ("fast", "fast (memory)")):
            for setting in ("1024", "0"):
                runs = ov[kind][setting]
                m = ov["median"][kind][setting]
                vs = "" if setting == "1024" else _pct(-ov["loss_pct"][kind])
                add(
                    f"| {what} | {setting} | {', '.join(f'{x:.1f}' for x in runs)} | "
                    f"{m:.1f} | {vs} |"
                )
        add("| seed (~40 MB/s) | 1024 / 0 | 45.8, 38.7, 38.7, 38.7, 38.7 (both) | 38.7 | 0% |")
        add("")
        add(
            "dd output as the seed printed it"
            + (" (the guest's own lines; `(dd+sync ...)`: ours):" if in_vm else ":")
        )
        add("")
        add("```")
        out.extend(results.get("dd_log", []))
        add("```")
        add("")
    add("## Checks")
    add("")
    ch = results.get("checks", {})
    for k, v in ch.items():
        add(f"- `{k}`: {v if not isinstance(v, float) else f'{v:.2f}'}")
    add("")
    add("## Host noise")
    add("")
    add(_noise(results))
    add("")
    if results.get("plots"):
        add("## Plots")
        add("")
        for p in results["plots"]:
            add(f"![{p}]({p})")
        add("")
    path.write_text("\n".join(out) + "\n")


ZERO_PAGES_TEXT = (
    "swpout_zero / swpin_zero: /proc/vmstat's zero-page swaps (Linux >= 6.12; `-` where the "
    "kernel lacks them). Since 6.12 the kernel swaps a page that is all zeroes out by "
    "setting a bit in the swap map, with no I/O, and counts it in `swpout_zero`, **not** in "
    "`pswpout` (its swap-in likewise in `swpin_zero`, not `pswpin`). The seed's kernel (2019) "
    "had no such shortcut, so there every swapped page was I/O and counted. A guest that "
    "writes zeroes fills dom0's pools with zero pages, and their swapping then hides from "
    "pswpin/pswpout: the guests here write random bytes, as real guests write real data, and "
    "these columns show what the shortcut still takes (pages that are zero in the hog's, "
    "the server's and the pools' memory)."
)

CONF_LABEL = {
    "off": "squeeze off",
    "10": "squeeze 10 ms",
    "1": "squeeze 1 ms",
    "100": "squeeze 100 ms",
    "wake-off": "10 ms, lazy (squeeze_wake=0)",
    "graded": "10 ms, graded",
    "auto": "auto (from 10 ms)",
    "k1": "1 ms as the seed ran it",
    "k10": "10 ms as the seed ran it",
    "k100": "100 ms as the seed ran it",
}


def _guests_text(cfg: dict[str, Any], per: dict[str, Any]) -> str:
    sz = cfg["sizing"]
    g = cfg.get("guests") or {"kind": "nbd"}
    rings = sz["devices"] * sz["connections"]
    if g["kind"] != "vm":
        return (
            f"- Guests, outside the cgroup: {sz['devices']} devices x {sz['connections']} "
            f"connection(s) = {rings} rings over real NBD connections (libnbd aio). Every ring "
            f"writes a burst of {sz['burst'] // MIB} MiB ({sz['burst'] // sz['request']} x "
            f"{sz['request'] // MIB} MiB in flight) every {sz['period_s']:g} s, staggered, and "
            f"idles in between. Exports: `null:1G,rate={sz['rate']}` (emulated network "
            "volumes, no local footprint)."
            + (f" (VM guests were not used: {g.get('reason')}.)" if g.get("reason") else "")
        )
    img = g.get("image", {})
    bursts = [r["guest"] for o in per.values() for r in o["runs"] if r.get("guest")]
    med = sorted(b["burst_s_median"] for b in bursts if b.get("burst_s_median") is not None)
    p95 = sorted(b["burst_s_p95"] for b in bursts if b.get("burst_s_p95") is not None)
    boot = sorted(b["boot_s"] for b in bursts if b.get("boot_s") is not None)
    timing = (
        f" Burst time seen by the guests (dd start to end, /proc/uptime): median over runs "
        f"{med[len(med) // 2]:.2f} s (runs {med[0]:.2f}-{med[-1]:.2f} s), p95 "
        f"{p95[len(p95) // 2]:.2f} s; boot of the {g['vms']} guests in parallel "
        f"{boot[len(boot) // 2]:.1f} s (not measured)."
        if med and p95 and boot
        else ""
    )
    return (
        f"- Guests, outside the cgroup: **{g['vms']} Linux VMs** (QEMU, {g['accel']}: "
        f"{g.get('accel_reason', '')}; {img.get('kernel_package', '?')} "
        f"{img.get('kernel_version', '')}, a busybox-static initramfs, "
        f"{g.get('memory_mib', '?')} MiB, 1 vCPU) with {rings // max(1, g['vms'])} virtio "
        f"disks each behind PCI bridges, {rings} in all: each disk is QEMU's NBD client on "
        f"one export (`null:1G,rate={sz['rate']}`, an emulated network volume with no local "
        "footprint), so one ring per virtual disk, as blkfront has one ring per virtual "
        f"device. Inside each guest, every disk gets one {sz['burst'] // MIB} MiB O_DIRECT "
        f"`dd` burst every {sz['period_s']:g} s, the disks staggered over the period, and "
        f"idles in between (`bursts.sh`, run by the guest's /init at the host's go)."
        f"{_guest_data(bursts)}{timing}"
    )


def _guest_data(bursts: list[dict[str, Any]]) -> str:
    """What the guests wrote, as they reported it (runs before they did wrote zeroes)."""
    data = next((b["data"] for b in bursts if b.get("data")), None)
    if data is None:
        return " The bursts wrote zeroes (`dd if=/dev/zero`)."
    return f" The bursts write {data}, not zeroes (see swpout_zero below)."


def _kernel_sweep_text(
    seed: dict[str, Any], ds: dict[str, Any], dk: dict[str, Any], per: dict[str, Any]
) -> str:
    rows = [
        "### The sweep as the seed ran it, beside blkback's default",
        "",
        "`squeeze_scope=global squeeze_wake=0` (the seed's v2 patch: one global deadline, "
        "idle rings see it only at their next 100 ms pass) with the server's pressure monitor "
        "off and its only signal the shrinker feed (`blkback.repro.shrinkerfeed`): one "
        "report each time dom0's reclaim ran (its `memory.failcnt` moved, polled every ~1 ms),"
        " the pace at which reclaim would call the patch's shrinker. blkback's default: "
        "per-device deadlines, idle rings woken, the kernel's pressure signals.",
        "",
        "| duration | seed pswpin | seed pswpout | default pswpin | default pswpout | "
        "as the seed ran it pswpin | as the seed ran it pswpout | its range pswpout |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for d in ("1", "10", "100"):
        s = seed["duration_sweep"][d]
        rows.append(
            f"| {d} ms | {_n(s['pswpin'])} | {_n(s['pswpout'])} | {_n(ds[d]['pswpin'])} | "
            f"{_n(ds[d]['pswpout'])} | {_n(dk[d]['pswpin'])} | {_n(dk[d]['pswpout'])} | "
            f"{_range(dk[d]['spread']['pswpout'])} |"
        )
    rows += ["", _config_table(per, ["k1", "k10", "k100"]), ""]
    rows += [
        "Pressure signals against reclaim (medians per run): how often dom0's reclaim ran "
        "(`memory.failcnt` increments: each charge that hit the limit, followed by a reclaim "
        "pass that would call every registered shrinker) and how often pressure reached the "
        "server.",
        "",
        "| configuration | seconds | reclaim passes | per s | pressure reports to the server "
        "| per s | passes per report | gap between reports, median / p90 (ms) "
        "| gaps shorter than 1 / 10 / 100 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in ("1", "10", "100", "k1", "k10", "k100"):
        if n not in per:
            continue
        o = per[n]
        secs = o.get("seconds") or 0.0
        passes = o.get("reclaim_passes", 0)
        reports = o["feed_reports"] if n.startswith("k") else o["pressure_reports"]
        rows.append(
            f"| {CONF_LABEL[n]} | {secs:.0f} | {_n(passes)} | "
            f"{passes / secs if secs else 0:.0f} | {_n(reports)} | "
            f"{reports / secs if secs else 0:.1f} | {passes / max(1, reports):.0f} | "
            f"{_gaps(o)} |"
        )
    rows += [
        "",
        "The last two columns (feed runs only: the kernel's signals are not timed per report) "
        "say which windows bridge the feed's re-arms. One global deadline of d ms re-armed at "
        "every report stays armed through a reclaim episode if the reports come less than "
        "d ms apart; idle rings, whose passes come every 100 ms, then meet it. A window "
        "shorter than most gaps lapses between re-arms and is mostly missed.",
    ]
    rows.append("")
    return "\n".join(rows)


def _gaps(o: dict[str, Any]) -> str:
    """The feed's gaps between reports: ``median / p90 ms | shares``, ``- | -`` without it."""
    within = o.get("feed_gaps_within_ms")
    if not within:
        return "- | -"
    shares = " / ".join("-" if within[w] is None else f"{100 * within[w]:.0f}%" for w in within)
    med, p90 = (o.get(k) for k in ("feed_gap_ms_median", "feed_gap_ms_p90"))
    gap = "-" if med is None or p90 is None else f"{med:.1f} / {p90:.0f}"
    return f"{gap} | {shares}"


def _ratio(ratio: float, after: int) -> str:
    """``before / after`` as ``Nx``; with nothing after it is a lower bound (``>= Nx``)."""
    return f"{ratio:,.0f}x" if after else f">= {ratio:,.0f}x (0 after)"


def _zero(o: dict[str, Any]) -> str:
    """``swpout_zero / swpin_zero`` of a configuration, ``-`` where the kernel lacks them."""
    return f"{_n(o.get('swpout_zero'))} / {_n(o.get('swpin_zero'))}"


def _runs(o: dict[str, Any]) -> str:
    return ", ".join(
        f"{_n(r['pswpin'])} / {_n(r['pswpout'])}{'*' if r.get('polluted') else ''}"
        for r in o["runs"]
    )


def _swap_text(cfg: dict[str, Any]) -> str:
    sw = cfg.get("swap", {})
    where = ", ".join(
        f"{s['filename']} ({int(s['size_kib']) // 1024} MiB)" for s in sw.get("swaps", [])
    )
    return ("a temporary swapfile " if sw.get("created_swapfile") else "the host's ") + where


def _config_table(per: dict[str, Any], names: list[str]) -> str:
    rows = [
        "| configuration | pswpin | pswpout | cgroup majfaults | cgroup anon refaults | "
        "swpout_zero / swpin_zero | max swap used | pressure events | squeezes | "
        "pools mean / max (pages) | guests' burst time, median (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for n in names:
        o = per[n]
        cg = o["cgroup"]
        rows.append(
            f"| {CONF_LABEL[n]} | {_n(o['pswpin'])} | {_n(o['pswpout'])} | "
            f"{_n(cg['pgmajfault'])} | {_n(cg['workingset_refault_anon'])} | {_zero(o)} | "
            f"{cg['max_swap_bytes'] / MIB:.0f} MiB | {_n(o['pressure_events'])} | "
            f"{_n(o['squeezes'])} | {_n(o['pool_pages_mean'])} / {_n(o['pool_pages_max'])} | "
            f"{o.get('guest_burst_s_median', 0.0):.2f} |"
        )
    return "\n".join(rows)


def _noise(results: dict[str, Any]) -> str:
    host = results.get("host", {})
    lines = []
    b = host.get("before", {})
    a = host.get("after", {})
    if "loadavg" in b:
        lines.append(
            f"- Load average before / after: {b['loadavg']} / {a.get('loadavg')} on "
            f"{results['config']['cpus']} CPUs (other tenants share this machine)."
        )
    idle = host.get("idle_swap_traffic")
    if idle:
        lines.append(
            f"- Host-wide swap traffic while we ran nothing ({idle['seconds']:g} s): "
            f"pswpin {idle['pswpin']}, pswpout {idle['pswpout']}."
        )
    per = results.get("configurations", {})
    for n, o in per.items():
        if len(o["runs"]) > 1:
            s = o["spread"]
            lines.append(
                f"- {CONF_LABEL[n]}: pswpout {_range(s['pswpout'])} (spread "
                f"{100 * s['pswpout']['rel']:.0f}% of the median), pswpin "
                f"{_range(s['pswpin'])} ({100 * s['pswpin']['rel']:.0f}%)."
            )
    ov = results.get("overhead")
    if ov:
        for kind in ("slow", "fast"):
            for setting in ("1024", "0"):
                xs = ov[kind][setting]
                if xs:
                    m = ov["median"][kind][setting]
                    lines.append(
                        f"- dd {kind}, max_buffer_pages={setting}: {min(xs):.1f}-{max(xs):.1f}"
                        f" MB/s ({100 * (max(xs) - min(xs)) / m:.1f}% of the median)."
                    )
    return "\n".join(lines) if lines else "- (nothing measured)"


def plot_all(results: dict[str, Any], out: Path) -> list[str]:
    """pools.png, swaps.png, dd.png (those that have data); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []
    per = results.get("configurations", {})
    if per:
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
        for n, o in per.items():
            s = o["runs"][0]["samples"]
            t = [x["t"] for x in s]
            ax1.plot(t, [x["pool_pages"] for x in s], label=CONF_LABEL[n], lw=1)
            ax2.plot(t, [x.get("cg_swap", 0) / MIB for x in s], label=CONF_LABEL[n], lw=1)
        ax1.set_ylabel("pool pages, all rings")
        ax1.set_title("Pool pages over time (first run of each configuration)")
        ax1.legend(fontsize=8)
        ax2.set_ylabel("dom0 cgroup swap used (MiB)")
        ax2.set_xlabel("seconds since the guests' first burst")
        fig.tight_layout()
        fig.savefig(out / "pools.png", dpi=90)
        plt.close(fig)
        made.append("pools.png")

        fig, ax = plt.subplots(figsize=(10, 5))
        names = list(per)
        x = range(len(names))
        for off, key in ((-0.2, "pswpin"), (0.2, "pswpout")):
            med = [max(1, per[n][key]) for n in names]
            lo = [med[i] - max(1, per[n]["spread"][key]["min"]) for i, n in enumerate(names)]
            hi = [max(1, per[n]["spread"][key]["max"]) - med[i] for i, n in enumerate(names)]
            ax.bar([i + off for i in x], med, width=0.4, label=key, yerr=[lo, hi], capsize=3)
        ax.set_yscale("log")
        ax.set_xticks(list(x))
        ax.set_xticklabels([CONF_LABEL[n] for n in names], rotation=15, fontsize=8)
        ax.set_ylabel("pages (median, min-max)")
        ax.set_title("Swap traffic per configuration")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "swaps.png", dpi=90)
        plt.close(fig)
        made.append("swaps.png")
    ov = results.get("overhead")
    if ov:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for kind, marker in (("slow", "o"), ("fast", "s")):
            for setting, ls in (("1024", "-"), ("0", "--")):
                ys = ov[kind][setting]
                ax.plot(
                    range(1, len(ys) + 1),
                    ys,
                    marker=marker,
                    ls=ls,
                    label=f"{kind}, max_buffer_pages={setting}",
                )
        ax.set_yscale("log")
        ax.set_xlabel("dd run")
        ax.set_ylabel("MB/s (dd + sync)")
        ax.set_title("dd throughput per run")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "dd.png", dpi=90)
        plt.close(fig)
        made.append("dd.png")
    return made
