"""The seed's shapes on a small configuration, the seed command's outputs, the Dask engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blkback.cli import main
from blkback.sim.runner import run_many
from blkback.sim.scenario import run_scenario, scenario_from_repro, seed_overhead
from blkback.sim.sweep import build_grid, make_scenario, mean_grid, rows


def swaps(variant: str, duration: int) -> dict[str, int]:
    sc = make_scenario(
        {"variant": variant, "duration": duration, "devices": 40, "memory": 820},
        seed=3,
        sim_seconds=20,
    )
    r = run_scenario(sc)
    return {"in": r["pswpin"], "out": r["pswpout"]}


def test_seed_shape_small() -> None:
    before = swaps("before", 10)
    d1, d10, d100 = (swaps("after", d) for d in (1, 10, 100))
    assert before["out"] > 5 * max(1, d10["out"])  # far fewer swaps with the squeeze
    assert before["in"] > 20 * max(1, d10["in"])
    assert d1["out"] > d10["out"] >= d100["out"]  # a longer window squeezes more


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
    assert lines[0].startswith("duration,max_buffer_pages,devices,memory,workload,variant")
    assert len(lines) == 5
    assert (tmp_path / "heatmap_pswpout.png").exists()
    assert (tmp_path / "heatmap_throughput_mbps.png").exists()


def test_bad_sweep_input_is_one_clear_error() -> None:
    assert main(["sim", "sweep", "--engine", "serial", "--quiet", "--devices", "x"]) == 2
    assert main(["sim", "run", "--variant", "nope", "--sim-seconds", "1"]) == 2


def test_repro_hook_builds_an_equivalent_scenario() -> None:
    sc = scenario_from_repro(
        {"memory_limit_mib": 1024, "devices": 8, "connections": 2, "rate_mbps": 20,
         "params": {"buffer_squeeze_duration_ms": 1}, "duration_s": 2}
    )  # fmt: skip
    assert sc.host.ram_mib == 1024
    assert sc.guests.disks_per_vm * sc.guests.vms == 8
    assert sc.guests.rings_per_disk == 2
    assert sc.guests.volume.mbps == 20
    r = run_scenario(sc)
    assert r["rings"] == 16
    assert r["sim_seconds"] == 2
