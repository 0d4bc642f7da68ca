"""The seed's shapes on a small configuration, the seed command's outputs, the Dask engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blkback.cli import main
from blkback.clock import NS_PER_S
from blkback.sim.runner import run_many
from blkback.sim.scenario import SimHost, run_scenario, scenario_from_repro, seed_overhead
from blkback.sim.sweep import build_grid, make_scenario, mean_grid, rows


def swaps(variant: str, duration: int) -> dict[str, int]:
    sc = make_scenario(
        {"variant": variant, "duration": duration, "devices": 40, "memory": 820},
        seed=3,
        sim_seconds=20,
    )
    r = run_scenario(sc)
    return {"in": r["pswpin"], "out": r["pswpout"]}


def swaps_and_calls(duration: int) -> tuple[int, int]:
    sc = make_scenario(
        {"variant": "after", "duration": duration, "devices": 40, "memory": 820},
        seed=3,
        sim_seconds=10,
    )
    r = run_scenario(sc)
    return r["pswpout"], r["shrinker_calls"]


def test_seed_shape_small() -> None:
    before = swaps("before", 10)
    d10 = swaps("after", 10)
    assert before["out"] > 5 * max(1, d10["out"])  # far fewer swaps with the squeeze
    assert before["in"] > 20 * max(1, d10["in"])


# One kswapd burst of slack: 256 pages (1 MiB) absorbs a single episode's noise.
KNEE_SLACK_PAGES = 256


def test_seed_knee_small() -> None:
    """The seed's knee: 1 ms clearly worse than 10 ms, 100 ms no better than 10 ms.

    Tolerance: 100 ms within 25 % of 10 ms or KNEE_SLACK_PAGES, whichever is larger; 1 ms at
    least twice 10 ms plus KNEE_SLACK_PAGES. Every run is under pressure (shrinker calls).
    """
    (o1, c1), (o10, c10), (o100, c100) = (swaps_and_calls(d) for d in (1, 10, 100))
    assert min(c1, c10, c100) > 0
    assert o1 >= 2 * o10 + KNEE_SLACK_PAGES
    assert abs(o100 - o10) <= max(0.25 * o10, KNEE_SLACK_PAGES)


def test_dd_overhead_invisible_on_the_slow_volume() -> None:
    a = run_scenario(seed_overhead(1024))["dd_mbps"]
    b = run_scenario(seed_overhead(0))["dd_mbps"]
    assert len(a) == len(b) == 5
    assert a[0] > a[1]  # the first run is faster (the volume's burst credit)
    for x, y in zip(a, b, strict=True):
        assert y == pytest.approx(x, rel=0.02)
        assert 35 < x < 50


def test_seed_command_writes_the_shared_schema(tmp_path: Path) -> None:
    code = main(
        [
            "sim",
            "seed",
            "--engine",
            "serial",
            "--quiet",
            "--sim-seconds",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc) == {"memory_pressure", "duration_sweep", "overhead", "config"}
    for k in ("before", "after"):
        assert set(doc["memory_pressure"][k]) == {"pswpin", "pswpout"}
    assert set(doc["duration_sweep"]) == {"1", "10", "100"}
    assert all(isinstance(v["pswpout"], int) for v in doc["duration_sweep"].values())
    for vol in ("slow", "fast"):
        assert set(doc["overhead"][vol]) == {"1024", "0"}
        assert len(doc["overhead"][vol]["0"]) == 5
    assert doc["memory_pressure"]["after"] == doc["duration_sweep"]["10"]
    report = (tmp_path / "report.md").read_text()
    assert "76,672" in report
    assert "Where and why" in report
    for png in ("memory_pressure.png", "duration_sweep.png", "overhead.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_small_sweep_on_the_dask_local_cluster(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    axes = {"duration": [1, 100], "devices": [10, 20]}
    points, scenarios = build_grid(axes, replicas=1, seed=5, sim_seconds=1.0)
    assert len(scenarios) == 4
    seen: list[int] = []
    on_dask = run_many(scenarios, engine="dask", workers=2, progress=lambda d, _t: seen.append(d))
    assert seen == [1, 2, 3, 4]
    assert on_dask == run_many(scenarios, engine="serial")  # same hosts, same results
    table = rows(points, on_dask)
    xs, ys, grid = mean_grid(table, "duration", "devices", "pswpout")
    assert xs == [1, 100]
    assert ys == [10, 20]
    assert len(grid) == 2


def test_sweep_command_csv_and_heatmaps(tmp_path: Path) -> None:
    code = main(
        [
            "sim", "sweep", "--engine", "processes", "--workers", "2", "--quiet",
            "--duration", "1,10", "--devices", "10,20", "--sim-seconds", "1",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    lines = (tmp_path / "results.csv").read_text().splitlines()
    header = "duration,max_buffer_pages,devices,memory,workload,background_iops,variant"
    assert lines[0].startswith(header)
    assert len(lines) == 5
    # The sweep's default workload has no background I/O (the seed scenario's costs 2.6x).
    assert all(line.split(",")[5] in ("0", "0.0") for line in lines[1:]), lines
    assert (tmp_path / "heatmap_pswpout.png").exists()
    assert (tmp_path / "heatmap_throughput_mbps.png").exists()


def test_bad_sweep_input_is_one_clear_error() -> None:
    assert main(["sim", "sweep", "--engine", "serial", "--quiet", "--devices", "x"]) == 2
    assert main(["sim", "run", "--variant", "nope", "--sim-seconds", "1"]) == 2


def _repro_doc() -> dict[str, object]:
    """A small results.json in blkback repro's schema (two configurations, one run each)."""
    mib = 2**20
    sizing = {"devices": 6, "connections": 1, "burst": 8 * mib, "request": 4 * mib,
              "period_s": 2.0, "rate": "40M", "hog_mib": 32, "slack_mib": 16,
              "seconds": 4.0, "sample_ms": 200}  # fmt: skip
    run = {"sizes": {"baseline_bytes": 20 * mib}, "guest": {"burst_s_median": 0.1},
           "pswpout": 100, "samples": [{"t": 0.0, "pool_pages": 0}]}  # fmt: skip
    measured = {"pswpin": 10, "pswpout": 100, "pool_pages_mean": 1000, "pool_pages_max": 2000,
                "squeezes": 3, "pressure_reports": 4, "runs": [run]}  # fmt: skip
    return {
        "config": {
            "quick": True, "repeats": 1, "kernel": "x", "sizing": sizing,
            "configurations": {"off": {"params": {"buffer_squeeze_duration_ms": 0}},
                               "10": {"params": {"buffer_squeeze_duration_ms": 10}}},
            "swap": {"swaps": [{"size_kib": str(512 * 1024)}]},
        },
        "configurations": {"off": measured, "10": measured},
    }  # fmt: skip


def test_repro_results_become_the_equivalent_scenario() -> None:
    sc = scenario_from_repro(_repro_doc(), "10")
    assert sc.host.ram_mib == 20 + 32 + 16  # baseline + hog + slack: the cgroup's limit
    assert sc.host.memcg and sc.host.pool_swappable
    assert sc.host.swap_mib == 512
    assert sc.guests.disks_per_vm * sc.guests.vms == 6
    assert sc.guests.max_indirect_segments == 1024 and sc.guests.queue_depth == 2
    assert sc.guests.volume.mbps == pytest.approx(8 * 2**20 / 0.1 / 1e6)
    assert sc.params == {"buffer_squeeze_duration_ms": 10}
    with pytest.raises(ValueError, match="no configuration"):
        scenario_from_repro(_repro_doc(), "100")


def test_calibration_pools_swap_without_a_squeeze_and_not_with_it(tmp_path: Path) -> None:
    src = tmp_path / "repro"
    src.mkdir()
    (src / "results.json").write_text(json.dumps(_repro_doc()))
    out = tmp_path / "cal"
    code = main(["sim", "calibrate", "--engine", "serial", "--quiet", "--repro", str(src),
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    cal = json.loads((out / "calibration.json").read_text())
    off, on = (cal["configurations"][k]["simulated"] for k in ("off", "10"))
    assert off["pswpout"] > 0 and off["pswpin"] > 0  # idle pool pages go to swap and back
    assert on["pswpout"] < off["pswpout"] // 2
    assert on["pswpin"] < off["pswpin"]
    assert on["squeezes"] > 0
    assert len(cal["configurations"]["10"]["samples"]["simulated"]) >= 20
    assert "measured pswpin" in (out / "report.md").read_text()
    assert (out / "pools.png").stat().st_size > 1000


def test_swappable_pools_conserve_pages() -> None:
    sim = SimHost(scenario_from_repro(_repro_doc(), "off"))
    for step in range(1, 31):
        sim.loop.run_until(step * NS_PER_S // 10)
        sim.check()
        assert sim.host.used <= sim.host.total
    assert sim.host.pool_swapped_total > 0
