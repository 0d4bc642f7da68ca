"""The pure parts of ``blkback repro``: dd parsing, aggregation, checks, report, plots.

No root needed: synthetic runs go through the same aggregation and report code as real ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from blkback.cli import build_parser
from blkback.repro.memory import zero_page_swaps
from blkback.repro.overhead import DD_RE, UNIT
from blkback.repro.report import _ratio, plot_all, write_report
from blkback.repro.runner import CONFIGS, SEED, aggregate_memory, checks
from blkback.repro.testbed import median, spread


def test_dd_line_parses_like_the_seed() -> None:
    seed = "536870912 bytes (537 MB) copied, 11.7257 s, 45.8 MB/s"
    ours = "67108864 bytes (67 MB, 64 MiB) copied, 0.114503 s, 586 MB/s"
    fast = "67108864 bytes (67 MB, 64 MiB) copied, 0.05 s, 1.3 GB/s"
    m = DD_RE.search(seed)
    assert m is not None and float(m.group(3)) == 45.8 and m.group(2) == "11.7257"
    m = DD_RE.search(ours)
    assert m is not None and m.group(1) == "67108864"
    m = DD_RE.search(fast)
    assert m is not None and float(m.group(3)) * UNIT[m.group(4)] == 1300.0


def test_median_and_spread() -> None:
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 2, 3]) == 2.5
    s = spread([90, 100, 110])
    assert s["median"] == 100 and s["rel"] == pytest.approx(0.2)


def _run(name: str, pin: int, pout: int, squeezes: int, rep: int) -> dict[str, Any]:
    pools = [0, 20000, 65536] if name == "off" else [0, 20000, 3000, 0]
    samples = [
        {
            "t": 0.2 * i,
            "pool_pages": p,
            "rings_nonempty": p // 1024,
            "squeezes": squeezes * (i > 1),
            "cg_swap": 1 << 20,
        }
        for i, p in enumerate(pools)
    ]
    feed = {
        "reports": 5,
        "gap_ms_median": 3.0 + rep,
        "gap_ms_p90": 200.0,
        "gaps_within_ms": {"1": 0.0, "10": (7 + rep) / 10, "100": 0.9},
    }
    return {
        **({"shrinker_feed": feed} if name.startswith("k") else {}),
        "config": name,
        "repeat": rep,
        "pswpin": pin,
        "pswpout": pout,
        "swpout_zero": 100 + rep,
        "swpin_zero": 10 + rep,
        "cgroup": {"pgmajfault": pin // 5, "workingset_refault_anon": pin, "max_swap_bytes": 1},
        "server": {
            "rings": 64,
            "squeezes": squeezes,
            "pages_squeezed": squeezes * 100,
            "pressure_reports": 5,
            "pressure_events": {"vmpressure:medium": 7},
        },
        "guest": {"burst_s_median": 0.1},
        "samples": samples,
        "sizes": {"baseline_bytes": 40 << 20, "limit_bytes": 424 << 20},
    }


def _results(tmp: Path) -> dict[str, Any]:
    numbers = {
        "off": (70000, 110000, 0),
        "10": (1500, 4000, 1000),
        "1": (30000, 50000, 900),
        "100": (50, 2000, 200),
        "wake-off": (9000, 14000, 3000),
        "graded": (9000, 13000, 2000),
        "auto": (1200, 3900, 1500),
        "k1": (20000, 40000, 800),
        "k10": (3000, 6000, 700),
        "k100": (2900, 5900, 600),
    }
    runs = {
        n: [_run(n, pi - r, po + r, sq, r) for r in range(3)] for n, (pi, po, sq) in numbers.items()
    }
    res: dict[str, Any] = {
        "config": {
            "experiment": "all",
            "quick": False,
            "repeats": 3,
            "kernel": "test",
            "cpus": 2,
            "python": "3",
            "seed": SEED,
            "sizing": {
                "devices": 64,
                "connections": 1,
                "burst": 8 << 20,
                "request": 4 << 20,
                "period_s": 8.0,
                "rate": "40M",
                "hog_mib": 256,
                "slack_mib": 128,
                "seconds": 60.0,
                "sample_ms": 200,
                "pools_mib": 256.0,
            },
            "configurations": {n: {"params": CONFIGS[n][0]} for n in numbers},
            "overhead": {"runs": 5, "dd": "dd ..."},
            "swap": {"created_swapfile": True, "swaps": [{"filename": "/x", "size_kib": "1024"}]},
            "guests": {
                "kind": "vm",
                "accel": "tcg",
                "vms": 2,
                "disks": 64,
                "accel_reason": "KVM tried first: QEMU failed",
                "memory_mib": 256,
                "image": {"kernel_package": "linux-image-6.1.0-9-cloud-amd64"},
            },
        },
        "host": {"before": {"loadavg": [1.0, 1.0, 1.0]}, "after": {"loadavg": [2.0, 2.0, 2.0]}},
        "elapsed_s": 60.0,
    }
    res.update(aggregate_memory(runs, list(numbers)))
    ov = {
        "slow": {"1024": [40.0, 39.0, 39.5, 39.6, 39.4], "0": [39.8, 39.5, 39.4, 39.5, 39.6]},
        "fast": {"1024": [300.0, 310.0, 305.0, 290.0, 300.0], "0": [250.0] * 5},
    }
    ov["median"] = {k: {s: median(v) for s, v in ov[k].items()} for k in ("slow", "fast")}
    ov["loss_pct"] = {
        k: 100 * (1 - ov["median"][k]["0"] / ov["median"][k]["1024"]) for k in ("slow", "fast")
    }
    res["overhead"] = ov
    res["dd_log"] = ["131072+0 records out"]
    res["checks"] = checks(res, quick=False)
    res["plots"] = plot_all(res, tmp)
    return res


def test_aggregate_checks_report_and_plots(tmp_path: Path) -> None:
    res = _results(tmp_path)
    mp = res["memory_pressure"]
    zero = {"swpout_zero": 101, "swpin_zero": 11}  # medians of the runs' own deltas
    assert mp["before"] == {"pswpin": 70000 - 1, "pswpout": 110000 + 1} | zero
    assert mp["after"] == {"pswpin": 1500 - 1, "pswpout": 4000 + 1} | zero
    assert set(res["duration_sweep"]) == {"1", "10", "100"}
    ch = res["checks"]
    assert ch["ratio_at_least_20x"] is True
    assert ch["sweep_not_increasing"] is True
    assert ch["slow_within_3pct"] is True
    per = res["configurations"]
    assert per["10"]["min_pool_pages_after_first_squeeze"] == 0
    assert per["off"]["squeezes"] == 0
    assert sorted(res["plots"]) == ["dd.png", "pools.png", "swaps.png"]
    write_report(res, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "| before (squeeze off) | 76,672 | 185,799 | 69,999 | 110,001 | 101 / 11 |" in text
    assert "counts it in `swpout_zero`, **not** in `pswpout`" in text
    assert "## 2. Squeeze duration sweep" in text and "## Host noise" in text
    assert res["memory_pressure"]["beyond"]["auto"] == {"pswpin": 1200 - 1, "pswpout": 3900 + 1}
    assert "| auto (from 10 ms) | 1,199 | 3,901 |" in text
    # The kernel-faithful sweep beside the default one, and the VM guests described.
    assert res["duration_sweep_kernel"]["10"] == {
        "pswpin": 3000 - 1,
        "pswpout": 6000 + 1,
        **zero,
        "spread": res["configurations"]["k10"]["spread"],
    }
    assert "| 10 ms | 212 | 3,325 | 1,499 | 4,001 | 2,999 | 6,001 |" in text
    assert "**2 Linux VMs** (QEMU, tcg: KVM tried first: QEMU failed;" in text
    # The feed's gaps between reports (medians over runs) beside the reclaim counts.
    assert per["k10"]["feed_gaps_within_ms"] == {"1": 0.0, "10": 0.8, "100": 0.9}
    assert "feed_gaps_within_ms" not in per["10"]
    assert "| 4.0 / 200 | 0% / 80% / 90% |" in text
    assert "| squeeze 10 ms | 0 | 0 | 0 | 5 | 0.0 | 0 | - | - |" in text  # no feed: no gaps
    json.dumps(res)  # everything is JSON-able


def test_zero_page_swaps_are_none_where_the_kernel_lacks_them(tmp_path: Path) -> None:
    """Kernels before 6.12 have no swpout_zero/swpin_zero: None, and "-" in the tables."""
    assert zero_page_swaps({"pswpout": 1}, {"pswpout": 5}) == {
        "swpout_zero": None,
        "swpin_zero": None,
    }
    assert zero_page_swaps(
        {"swpout_zero": 7, "swpin_zero": 1}, {"swpout_zero": 19, "swpin_zero": 4}
    ) == {"swpout_zero": 12, "swpin_zero": 3}
    runs = {n: [_run(n, 900, 800, 5, r) for r in range(2)] for n in ("off", "10")}
    for r in runs["off"][:1]:  # one run without the counters: no median of a partial set
        r["swpout_zero"] = r["swpin_zero"] = None
    per = aggregate_memory(runs, ["off", "10"])
    assert per["memory_pressure"]["before"]["swpout_zero"] is None
    assert per["memory_pressure"]["after"]["swpout_zero"] == 100  # median of 100, 101 -> int
    assert per["configurations"]["off"]["swpin_zero"] is None


def test_a_reduction_to_nothing_is_shown_as_a_lower_bound() -> None:
    assert _ratio(185799 / 3325, 3325) == "56x"
    assert _ratio(59541.0, 0) == ">= 59,541x (0 after)"  # before / max(1, after)


def test_sweep_check_flags_an_increase(tmp_path: Path) -> None:
    res = _results(tmp_path)
    per = res["configurations"]
    for k in ("pswpin", "pswpout"):
        per["100"]["spread"][k]["min"] = per["10"]["spread"][k]["max"] * 10 + 5000
    assert checks(res, quick=False)["sweep_not_increasing"] is False


def test_cli_registers_repro() -> None:
    args = build_parser().parse_args(["repro", "overhead", "--quick", "--out", "x"])
    assert isinstance(args, argparse.Namespace)
    assert args.experiment == "overhead" and args.quick and args.out == "x"
    assert build_parser().parse_args(["repro"]).experiment == "all"


def test_runs_polluted_by_other_tenants_are_left_out_of_the_host_wide_median(
    tmp_path: Path,
) -> None:
    from blkback.repro.runner import polluted, rerender

    clean = _run("10", 1500, 4000, 100, 0)
    assert not polluted(clean)
    noisy = _run("10", 250_000, 380_000, 100, 1)
    noisy["cgroup"]["workingset_refault_anon"] = 1200  # dom0 itself was quiet
    assert polluted(noisy)
    res = _results(tmp_path)
    res["configurations"]["10"]["runs"][2] = noisy
    src = tmp_path / "in.json"
    src.write_text(json.dumps(res))
    again = rerender(src, tmp_path / "out", plots=False)
    ten = again["configurations"]["10"]
    assert ten["clean_runs"] == 2
    assert ten["pswpout"] < 10_000  # the polluted run is not in the median
    assert "/ 380,000*" in (tmp_path / "out" / "report.md").read_text()
