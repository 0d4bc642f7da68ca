"""The benchmarks that moved into bench/ still run under their old command names."""

from __future__ import annotations

import json
import subprocess

from support import blkback_cmd, child_env

from blkback.cli import SUBCOMMANDS, build_parser


def test_pressure_latency_is_the_bench_module_under_the_pressure_command() -> None:
    args = build_parser().parse_args(["pressure", "latency", "--connections", "2"])
    assert args._module.__name__ == "blkback.bench.latency"
    assert SUBCOMMANDS["pressure"]["latency"][0] == "blkback.bench.latency"
    # The pressure command's own actions still go to pressure.command.
    assert build_parser().parse_args(["pressure", "probe"])._module.__name__ == (
        "blkback.pressure.command"
    )


def test_pressure_latency_runs_end_to_end() -> None:
    """Two idle rings, two reports per mode: the wake mode empties every pool each time."""
    res = subprocess.run(
        blkback_cmd(
            "pressure", "latency", "--connections", "2", "--reports", "2", "--fill-mib", "1",
            "--json",
        ),
        capture_output=True, text=True, env=child_env(), timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["connections"] == 2
    assert out["wake"]["observed_ms"]["count"] == 2
    assert out["wake"]["reports_where_some_ring_kept_its_pool"] == 0
    assert out["wake"]["in_server_ms"]["count"] >= 2


def test_microbench_runs() -> None:
    res = subprocess.run(
        blkback_cmd("microbench", "--rounds", "200", "--json"),
        capture_output=True, text=True, env=child_env(), timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["warm_get_put"]["ns_per_page"] > 0
    assert out["shrink_100MiB_batch10"]["mib_per_s"] > 0
