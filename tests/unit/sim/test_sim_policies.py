"""``blkback sim policies --quick``: the grid's schema, auto's bounds and the targets."""

from __future__ import annotations

import json
from pathlib import Path

from blkback.cli import main
from blkback.sim.policies import POLICIES, QUICK_AXES, beats, verdict


def test_quick_grid_writes_results_report_and_plot(tmp_path: Path) -> None:
    code = main(
        ["sim", "policies", "--quick", "--engine", "serial", "--quiet", "--out", str(tmp_path)]
    )
    assert code == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    points = [e["point"] for e in doc["grid"]]
    assert len(points) == len(QUICK_AXES["workload"]) * len(QUICK_AXES["memory"])
    assert {p["workload"] for p in points} == {"bursty", "random", "dd"}
    pressured = 0
    for entry in doc["grid"]:
        assert list(entry["policies"]) == ["1", "5", "10", "50", "100", "auto"]
        for counts in entry["policies"].values():
            assert set(counts) == {"pswpout", "pswpin", "refills"}
            assert all(isinstance(v, int) and v >= 0 for v in counts.values())
        durations = entry["auto"]["durations_ms"]
        if durations:  # auto saw pressure here: every device's duration within its bounds
            pressured += 1
            assert all(1 <= float(d) <= 1000 for d in durations)
            # the 100 ms window frees pages for longer than the 1 ms one: more are refilled
            assert entry["policies"]["100"]["refills"] > entry["policies"]["1"]["refills"]
    assert pressured >= 4
    assert doc["verdict"] == verdict(doc["grid"])
    assert doc["verdict"]["met"], doc["verdict"]
    report = (tmp_path / "report.md").read_text()
    assert "| dd 20 dev 384 MiB |" in report and "## Targets" in report
    assert (tmp_path / "policies.png").stat().st_size > 0


def test_beats_needs_both_metrics_lower_by_more_than_the_margin() -> None:
    auto = {"pswpout": 1000, "pswpin": 0, "refills": 1000}
    assert beats({"pswpout": 899, "pswpin": 0, "refills": 899}, auto)
    assert not beats({"pswpout": 899, "pswpin": 0, "refills": 900}, auto)
    assert not beats({"pswpout": 0, "pswpin": 0, "refills": 2000}, auto)
    grid = [{"point": {"x": 1}, "policies": {p: dict(auto) for p in POLICIES}}]
    grid[0]["policies"]["5"] = {"pswpout": 10, "pswpin": 0, "refills": 10}
    v = verdict(grid)
    assert v["points_beaten"] == [{"point": {"x": 1}, "by": ["5"]}] and not v["met"]
