"""Runs the chosen experiments in order, aggregates the repeats, writes the outputs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from blkback.clock import NS_PER_S, Clock
from blkback.repro.guests import GuestChoice, choose_guests
from blkback.repro.memory import ZERO_PAGE_COUNTERS, Config, Sizing, run_once, sizing_dict
from blkback.repro.testbed import CLOCK, Progress, median, sigterm_as_interrupt, spread

SEED = {
    "memory_pressure": {
        "before": {"pswpin": 76672, "pswpout": 185799},
        "after": {"pswpin": 212, "pswpout": 3325},
    },
    "duration_sweep": {
        "1": {"pswpin": 852, "pswpout": 6424},
        "10": {"pswpin": 212, "pswpout": 3325},
        "100": {"pswpin": 203, "pswpout": 3340},
    },
    "overhead": {"1024": [45.8, 38.7, 38.7, 38.7, 38.7], "0": [45.8, 38.7, 38.7, 38.7, 38.7]},
}

# name -> (params, what it is)
CONFIGS: dict[str, tuple[dict[str, int | str], str]] = {
    "off": ({"buffer_squeeze_duration_ms": 0}, "squeeze off (before the patch)"),
    "10": ({"buffer_squeeze_duration_ms": 10}, "squeeze 10 ms (the patch's default)"),
    "1": ({"buffer_squeeze_duration_ms": 1}, "squeeze 1 ms"),
    "100": ({"buffer_squeeze_duration_ms": 100}, "squeeze 100 ms"),
    "wake-off": (
        {"buffer_squeeze_duration_ms": 10, "squeeze_wake": 0},
        "squeeze 10 ms, kernel-lazy (idle rings see it at their next 100 ms pass)",
    ),
    "graded": (
        {"buffer_squeeze_duration_ms": 10, "squeeze_policy": "graded"},
        "squeeze 10 ms, graded policy",
    ),
    "auto": (
        {"buffer_squeeze_duration_ms": 10, "squeeze_policy": "auto"},
        "squeeze_policy=auto (a duration tuned per device, from 10 ms)",
    ),
}
# The sweep as the seed's v2 patch ran it: one global deadline, no wake-up of idle rings.
KERNEL_FAITHFUL: dict[str, int | str] = {"squeeze_scope": "global", "squeeze_wake": 0}
for _ms in ("1", "10", "100"):
    CONFIGS[f"k{_ms}"] = (
        {"buffer_squeeze_duration_ms": int(_ms), **KERNEL_FAITHFUL},
        f"squeeze {_ms} ms, as the seed ran it (global deadline, no wake-up, reports at "
        "reclaim's pace)",
    )
SWEEP = ("1", "10", "100")
SWAP_PRIORITY = 1000  # above the host's swaps (those made without -p get negative ones)
SHRINKER_FED = {f"k{ms}" for ms in SWEEP}


class Runner:
    """Holds the options, the output directory and the collected results."""

    def __init__(self, args: argparse.Namespace, clock: Clock = CLOCK) -> None:
        self.clock = clock
        self.experiment: str = args.experiment
        self.quick: bool = args.quick
        self.out = Path(args.out)
        self.plots = not args.no_plots
        self.repeats: int = args.repeats or (1 if self.quick else 3)
        base = Sizing()
        seconds = args.seconds or (15.0 if self.quick else 60.0)
        self.sizing = Sizing(
            devices=args.devices or base.devices,
            seconds=seconds,
            period_s=base.period_s,
            settle_s=1.0 if self.quick else base.settle_s,
        )
        self.dd_runs = 2 if self.quick else 5
        self.dd_count = 256 * 64 if self.quick else 256 * 512
        self.log_lines: list[str] = []
        self.t0_ns = 0
        self.guests_wanted: str = args.guests
        self.accel_wanted: str = args.accel
        self.vms: int = args.vms

    # -- what runs ------------------------------------------------------------------------
    def memory_configs(self) -> list[str]:
        names: list[str] = []
        if self.experiment in ("memory-pressure", "all"):
            names += ["off", "10", "wake-off", "graded", "auto"]
        if self.experiment in ("duration-sweep", "all"):
            names += [n for n in SWEEP if n not in names]
            names += [f"k{n}" for n in SWEEP]
        return names

    def log(self, line: str) -> None:
        """A line of the dd log (kept for the report) and of stderr."""
        self.log_lines.append(line)
        self.note(line)

    def note(self, line: str) -> None:
        """A line for stderr only."""
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    # -- the whole thing ------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from blkback.hostenv.swap import TemporarySwap, active_swaps

        self.out.mkdir(parents=True, exist_ok=True)
        configs = self.memory_configs()
        do_overhead = self.experiment in ("overhead", "all")
        steps = len(configs) * self.repeats + (4 if do_overhead else 0)
        progress = Progress(steps, "repro")
        t0_ns = self.t0_ns = self.clock.now_ns()
        results: dict[str, Any] = {"config": self.config_dict(configs), "complete": False}
        results["host"] = {"before": host_snapshot()}
        work = Path(tempfile.mkdtemp(prefix="blkback-repro-", dir="/tmp"))
        results["config"]["workdir"] = str(work)
        results["config"]["pid"] = os.getpid()
        with sigterm_as_interrupt(), contextlib.ExitStack() as stack:
            stack.callback(shutil.rmtree, work, True)
            guests = choose_guests(self.guests_wanted, self.accel_wanted, self.vms, work, self.note)
            results["config"]["guests"] = guests.describe(self.sizing.devices)
            if configs:
                # Always our own swap, preferred by the kernel: another tenant's swap may
                # go away mid-run (then dom0 cannot swap and the hog is OOM-killed).
                swap = stack.enter_context(
                    TemporarySwap(2048, reuse_host=False, priority=SWAP_PRIORITY)
                )
                results["config"]["swap"] = {
                    "created_swapfile": swap.created,
                    "swaps": active_swaps(),
                }
                results["host"]["idle_swap_traffic"] = idle_swap_traffic(3.0, self.clock)
                runs = self.memory_runs(configs, work, progress, guests, results)
                results.update(aggregate_memory(runs, configs))
            if do_overhead:
                results["overhead"] = self.overhead(work, progress, guests)
        results["host"]["after"] = host_snapshot()
        results["elapsed_s"] = (self.clock.now_ns() - t0_ns) / NS_PER_S
        results["complete"] = True
        results["checks"] = checks(results, quick=self.quick)
        self.write(results)
        self.partial_path.unlink(missing_ok=True)
        return results

    @property
    def partial_path(self) -> Path:
        return self.out / "partial-results.json"

    def checkpoint(self, results: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> None:
        """The runs so far, for ``--from-results`` if the whole does not finish."""
        partial = dict(results)
        partial["configurations"] = {n: {"runs": rs} for n, rs in runs.items() if rs}
        partial["elapsed_s"] = (self.clock.now_ns() - self.t0_ns) / NS_PER_S
        self.partial_path.write_text(json.dumps(partial, default=str) + "\n")

    def memory_runs(
        self,
        configs: list[str],
        work: Path,
        progress: Progress,
        guests: GuestChoice,
        results: dict[str, Any],
    ) -> dict[str, list[dict[str, Any]]]:
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
        # Round robin over configurations, so that host noise spreads over all of them.
        for rep in range(self.repeats):
            for name in configs:
                progress.step(f"memory pressure: {name} (run {rep + 1}/{self.repeats})")
                params, label = CONFIGS[name]
                r = run_once(
                    Config(name, params, label, shrinker_feed=name in SHRINKER_FED),
                    self.sizing,
                    work / "mp",
                    tag=f"{name}-{rep}",
                    guests=guests.factory(),
                    clock=self.clock,
                )
                r["repeat"] = rep
                runs[name].append(r)
                self.checkpoint(results, runs)
                progress.advance(
                    f"{name}: pswpin {r['pswpin']:,} pswpout {r['pswpout']:,}"
                    f" (cgroup majfaults {r['cgroup']['pgmajfault']:,})"
                )
        return runs

    def overhead(self, work: Path, progress: Progress, guests: GuestChoice) -> dict[str, Any]:
        from blkback.repro.overhead import OverheadPlan, run_volume
        from blkback.repro.vmoverhead import run_volumes_vm

        out: dict[str, Any] = {"where": "vm" if guests.setup is not None else "host"}
        plan = OverheadPlan(
            runs=self.dd_runs,
            count=self.dd_count,
            size="1G",
            rate="40M",
            log=self.log,
            on_step=progress.advance,
            clock=self.clock,
        )
        raw: dict[str, Any] = {}
        if guests.setup is not None:
            progress.step("overhead: one guest, slow and fast volumes (mkfs)")
            raw = run_volumes_vm(work, guests.setup, plan)
        else:
            for kind in ("slow", "fast"):
                progress.step(f"overhead: {kind} volume (mkfs)")
                raw[kind] = run_volume(kind, work, plan)
        for kind, r in raw.items():
            out[kind] = {k: [x["mb_s"] for x in v] for k, v in r["runs"].items()}
        out["dd_mb_s"] = {
            kind: {k: [x["dd_mb_s"] for x in v] for k, v in raw[kind]["runs"].items()}
            for kind in raw
        }
        out["median"] = {
            kind: {k: median(v) for k, v in out[kind].items()} for kind in ("slow", "fast")
        }
        out["loss_pct"] = {
            kind: 100.0 * (1 - out["median"][kind]["0"] / out["median"][kind]["1024"])
            for kind in ("slow", "fast")
        }
        out["raw"] = raw
        return out

    def config_dict(self, configs: list[str]) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "quick": self.quick,
            "repeats": self.repeats,
            "sizing": sizing_dict(self.sizing),
            "configurations": {
                n: {"params": CONFIGS[n][0], "label": CONFIGS[n][1]} for n in configs
            },
            "overhead": {
                "runs": self.dd_runs,
                "dd": f"dd if=/dev/zero of=file bs=4k count={self.dd_count}; sync",
                "slow": "memory:1G,rate=40M",
                "fast": "memory:1G",
                "settings": [1024, 0],
            },
            "seed": SEED,
            "python": sys.version.split()[0],
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
        }

    def write(self, results: dict[str, Any]) -> None:
        results["dd_log"] = self.log_lines
        write_outputs(results, self.out, plots=self.plots, log=self.log)


def write_outputs(
    results: dict[str, Any], out: Path, *, plots: bool = True, log: Any = None
) -> None:
    """results.json, report.md and the plots into ``out``."""
    from blkback.repro.report import plot_all, write_report

    made: list[str] = []
    if plots:
        try:
            made = plot_all(results, out)
        except ImportError as exc:
            if log is not None:
                log(f"repro: no plots ({exc}); install matplotlib")
    results["plots"] = made
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_report(results, out / "report.md")


def rerender(source: Path, out: Path, *, plots: bool = True) -> dict[str, Any]:
    """Aggregate a results.json's raw runs again and rewrite the report (no experiments)."""
    results: dict[str, Any] = json.loads(source.read_text())
    per = results.get("configurations") or {}
    if per:
        runs = {n: c["runs"] for n, c in per.items()}
        results.update(aggregate_memory(runs, list(runs)))
    results["checks"] = checks(results, quick=bool(results["config"].get("quick")))
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(results, out, plots=plots)
    return results


def polluted(r: dict[str, Any]) -> bool:
    """Whether other tenants' swapping shows in this run's host-wide counters.

    ``/proc/vmstat`` is host-wide, and other processes on a shared host may swap (to the
    same swap areas) during a run. The cgroup's own ``workingset_refault_anon`` counts the
    anon pages that dom0 faulted back in from swap, which is ``pswpin`` when dom0 is the
    only one swapping (within a few % either way: swap readahead). A run whose ``pswpin``
    exceeds 1.5 x that + 2,000 pages had someone else swapping too.
    """
    own = r["cgroup"]["workingset_refault_anon"]
    return bool(r["pswpin"] > 1.5 * own + 2000)


def aggregate_memory(runs: dict[str, list[dict[str, Any]]], configs: list[str]) -> dict[str, Any]:
    """Medians and spreads per configuration, in the results.json layout.

    The host-wide pswpin/pswpout medians are over the runs not :func:`polluted` by other
    tenants (over all runs when every one is); the cgroup's own counters use all runs.
    """
    per: dict[str, Any] = {}
    for name, all_rs in runs.items():
        for r in all_rs:
            r["polluted"] = polluted(r)
        rs = [r for r in all_rs if not r["polluted"]] or all_rs
        summary: dict[str, Any] = {
            "pswpin": int(median([r["pswpin"] for r in rs])),
            "pswpout": int(median([r["pswpout"] for r in rs])),
            "clean_runs": len([r for r in all_rs if not r["polluted"]]),
            **{k: _median_or_none([r.get(k) for r in rs]) for k in ZERO_PAGE_COUNTERS},
            "spread": {
                "pswpin": spread([r["pswpin"] for r in rs]),
                "pswpout": spread([r["pswpout"] for r in rs]),
            },
            "spread_cgroup": {
                k: spread([r["cgroup"][k] for r in all_rs])
                for k in ("workingset_refault_anon", "pgmajfault")
            },
            "cgroup": {
                k: int(median([r["cgroup"][k] for r in all_rs])) for k in all_rs[0]["cgroup"]
            },
            "squeezes": int(median([r["server"]["squeezes"] for r in all_rs])),
            "pages_squeezed": int(median([r["server"]["pages_squeezed"] for r in all_rs])),
            "pressure_reports": int(median([r["server"]["pressure_reports"] for r in all_rs])),
            "pressure_events": int(
                median([sum(r["server"]["pressure_events"].values()) for r in all_rs])
            ),
            "pool_pages_mean": int(median([_mean_pool(r) for r in all_rs])),
            "pool_pages_max": int(median([_max_pool(r) for r in all_rs])),
            "min_pool_pages_after_first_squeeze": min(_min_after_squeeze(r) for r in all_rs),
            "min_rings_holding_pages_after_first_squeeze": min(
                _min_after_squeeze(r, "rings_nonempty") for r in all_rs
            ),
            "rings": all_rs[0]["server"]["rings"],
            # How often reclaim ran (each would have called a kernel shrinker) against how
            # often pressure reached the server (kernel signals, or the shrinker feed).
            "reclaim_passes": int(
                median([r.get("reclaim", {}).get("cgroup_failcnt", 0) for r in all_rs])
            ),
            "feed_reports": int(
                median([r.get("shrinker_feed", {}).get("reports", 0) for r in all_rs])
            ),
            **_feed_gaps(all_rs),
            "seconds": median([r.get("elapsed_s", 0.0) for r in all_rs]),
            "guest_burst_s_median": median(
                [r["guest"].get("burst_s_median") or 0.0 for r in all_rs]
            ),
            "runs": all_rs,
        }
        per[name] = summary
    out: dict[str, Any] = {"configurations": per}
    if "off" in per and "10" in per:
        out["memory_pressure"] = {
            "before": _swaps(per["off"]),
            "after": _swaps(per["10"]),
            "ratio": {k: per["off"][k] / max(1, per["10"][k]) for k in ("pswpin", "pswpout")},
            "cgroup": {
                when: {k: per[n]["cgroup"][k] for k in ("workingset_refault_anon", "pgmajfault")}
                for when, n in (("before", "off"), ("after", "10"))
            },
            "cgroup_ratio": {
                k: per["off"]["cgroup"][k] / max(1, per["10"]["cgroup"][k])
                for k in ("workingset_refault_anon", "pgmajfault")
            },
            "beyond": {
                n: {"pswpin": per[n]["pswpin"], "pswpout": per[n]["pswpout"]}
                for n in ("wake-off", "graded", "auto")
                if n in per
            },
        }
    for key, prefix in (("duration_sweep", ""), ("duration_sweep_kernel", "k")):
        if all(prefix + n in per for n in SWEEP):
            out[key] = {
                n: _swaps(per[prefix + n]) | {"spread": per[prefix + n]["spread"]} for n in SWEEP
            }
    return out


def _feed_gaps(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """The shrinker feed's gaps between reports (medians over runs); {} without a feed."""
    feeds = [r["shrinker_feed"] for r in rs if r.get("shrinker_feed")]
    if not feeds:
        return {}
    within = [f.get("gaps_within_ms") or {} for f in feeds]
    return {
        "feed_gap_ms_median": _median_share([f.get("gap_ms_median") for f in feeds]),
        "feed_gap_ms_p90": _median_share([f.get("gap_ms_p90") for f in feeds]),
        "feed_gaps_within_ms": {
            w: _median_share([x.get(w) for x in within]) for w in ("1", "10", "100")
        },
    }


def _median_share(values: list[Any]) -> float | None:
    """The median of floats, or None when a run lacks them."""
    have = [v for v in values if v is not None]
    return median(have) if have and len(have) == len(values) else None


def _median_or_none(values: list[Any]) -> int | None:
    """The median, or None when a run lacks the counter (kernels before 6.12)."""
    have = [v for v in values if v is not None]
    return int(median(have)) if have and len(have) == len(values) else None


def _swaps(summary: dict[str, Any]) -> dict[str, Any]:
    """pswpin/pswpout and, beside them, the zero-page swaps they do not count."""
    return {k: summary.get(k) for k in ("pswpin", "pswpout", *ZERO_PAGE_COUNTERS)}


def _mean_pool(r: dict[str, Any]) -> float:
    s = r["samples"]
    return sum(x["pool_pages"] for x in s) / len(s) if s else 0.0


def _max_pool(r: dict[str, Any]) -> int:
    return max((x["pool_pages"] for x in r["samples"]), default=0)


def _min_after_squeeze(r: dict[str, Any], key: str = "pool_pages") -> int:
    """Smallest ``key`` sampled after the first squeeze (the largest, without squeezes)."""
    s = r["samples"]
    first = next((i for i, x in enumerate(s) if x["squeezes"] > 0), None)
    if first is None:
        return int(max((x[key] for x in s), default=0))
    return int(min(x[key] for x in s[first:]))


def checks(results: dict[str, Any], *, quick: bool) -> dict[str, Any]:
    """The issue's acceptance criteria, evaluated on this run's numbers."""
    out: dict[str, Any] = {}
    mp = results.get("memory_pressure")
    if mp:
        out["pswpout_ratio"] = mp["ratio"]["pswpout"]
        out["pswpin_ratio"] = mp["ratio"]["pswpin"]
        out["ratio_at_least_20x"] = mp["ratio"]["pswpout"] >= 20 and mp["ratio"]["pswpin"] >= 20
        # The seed's own cuts: pswpout 185,799 -> 3,325 (56x), pswpin 76,672 -> 212 (361x).
        out["seed_ratios_met"] = mp["ratio"]["pswpout"] >= 56 and mp["ratio"]["pswpin"] >= 361
        out["cgroup_refault_ratio"] = mp["cgroup_ratio"]["workingset_refault_anon"]
        out["cgroup_majfault_ratio"] = mp["cgroup_ratio"]["pgmajfault"]
    ds = results.get("duration_sweep")
    if ds:
        per = results["configurations"]
        ok = True
        for a, b in (("1", "10"), ("10", "100")):
            for k in ("pswpin", "pswpout"):
                lo_b = per[b]["spread"][k]["min"]
                hi_a = per[a]["spread"][k]["max"]
                # "does not increase beyond noise": b's best run is no worse than a's worst
                # run, with a floor of 1,000 pages for tiny counts.
                if lo_b > max(hi_a, per[a][k] + 1000):
                    ok = False
        out["sweep_not_increasing"] = ok
    ov = results.get("overhead")
    if ov:
        out["slow_loss_pct"] = ov["loss_pct"]["slow"]
        out["fast_loss_pct"] = ov["loss_pct"]["fast"]
        out["slow_within_3pct"] = abs(ov["loss_pct"]["slow"]) <= 3.0
    out["quick"] = quick
    return out


def host_snapshot() -> dict[str, Any]:
    """Load and pressure of the host now (to say how noisy it was)."""
    # Unix time, not the Clock's: a reader matches it with the quiet slots and other logs.
    snap: dict[str, Any] = {"time": time.time()}
    with contextlib.suppress(OSError):
        snap["loadavg"] = [float(x) for x in _read("/proc/loadavg").split()[:3]]
    for res in ("cpu", "memory", "io"):
        with contextlib.suppress(OSError):
            snap[f"psi_{res}"] = _read(f"/proc/pressure/{res}").strip().splitlines()
    with contextlib.suppress(OSError):
        meminfo = {}
        for line in _read("/proc/meminfo").splitlines():
            k, _, v = line.partition(":")
            if k in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree"):
                meminfo[k] = int(v.split()[0]) * 1024
        snap["meminfo"] = meminfo
    return snap


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def idle_swap_traffic(seconds: float, clock: Clock = CLOCK) -> dict[str, Any]:
    """Host-wide pswpin/pswpout while we run nothing: other tenants' swapping."""
    from blkback.hostenv.procfs import swap_counters

    a = swap_counters()
    clock.wait_until(clock.now_ns() + round(seconds * NS_PER_S))
    b = swap_counters()
    d = b - a
    return {"seconds": seconds, "pswpin": d.pswpin, "pswpout": d.pswpout}
