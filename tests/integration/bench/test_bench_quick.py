"""``blkback bench --quick`` against the real servers: every server answers, the report is whole.

Speed is not checked here (a 2 s cell on a shared 2-core machine says nothing); only that
every selected server served every cell, CPU was sampled, and report.md, results.json and
report.png were written. blkback's own cells join once its ``serve`` command exists.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from blkback.bench.servers import SERVERS
from blkback.cli import COMMANDS, main

pytestmark = pytest.mark.slow


def _servers() -> list[str]:
    names = ["nbdkit", "nbdkit-t1", "qemu-nbd"]
    if "serve" in COMMANDS and "ctl" in COMMANDS:
        names += [s for s in SERVERS if SERVERS[s].kind == "blkback"]
    return names


def test_quick_run_is_complete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for tool in ("fio", "nbdkit", "qemu-nbd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (scripts/setup installs it)")
    servers = _servers()
    out = tmp_path / "out"
    t0 = time.monotonic()
    rc = main(["bench", "--quick", "--servers", ",".join(servers), "--out", str(out), "--json"])
    elapsed = time.monotonic() - t0
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    # Designed for ~80 s on an idle 2-core box; the margin is for a machine shared with others.
    assert elapsed < 240, f"--quick took {elapsed:.0f} s"

    report = json.loads(captured.out)
    assert report["complete"], (report["missing_cells"], report["unsampled_cells"])
    rows = {(r["server"], r["workload"]): r for r in report["summary"]}
    for w in report["config"]["workloads"]:
        for s in servers:
            if SERVERS[s].price_only and w not in report["config"]["price_workloads"]:
                continue
            row = rows[(s, w)]
            assert row["n_ok"] == 1, (s, w, row["errors"])
            assert row["iops"] > 0
            assert row["mb_s"] > 0
            assert row["lat_p99_us"] > 0
            assert row["server_cpu_pct"] is not None
            assert row["server_us_per_op"] is not None
            assert row["host_busy_pct"] is not None
    ratios = {r["workload"]: r for r in report["ratios"]}
    assert set(ratios) == set(report["config"]["workloads"])
    assert all(r["best_nbdkit"] in ("nbdkit", "nbdkit-t1") for r in ratios.values())
    if "blkback" in servers:
        assert all(r["throughput_ratio"] is not None for r in ratios.values())
        assert report["steady_state"]["warm_pool_allocates"] is not None
        variants = {(p["workload"], p["variant"]) for p in report["price"]}
        for w in report["config"]["price_workloads"]:
            for v in ("blkback", "blkback-nopool", "blkback-squeeze"):
                assert (w, v) in variants
        assert all(p["allocs_per_request"] is not None for p in report["price"])

    md = (out / "report.md").read_text()
    for s in servers:
        assert s in md
    for w in report["config"]["workloads"]:
        assert w in md
    assert json.loads((out / "results.json").read_text())["complete"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
