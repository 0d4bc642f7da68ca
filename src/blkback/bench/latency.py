"""How fast a pressure report empties every idle ring: the squeeze latency benchmark.

Run as ``blkback pressure latency`` (registered by cli.py: pressure/ does not import bench/).

Starts ``blkback serve`` with N exports on the null backend, holds one libnbd connection to
each (idle rings), and repeats: fill every ring's pool (a write of ``fill`` bytes per
connection), wait for the rings to go idle, report pressure, and record

* ``in_server``: the server's own measurement, from the report's delivery to the end of the
  last woken ring pass (every pool at 0), taken from ``ctl stats``;
* ``observed``: from sending the report to every pool reading 0 in ``ctl stats``, which adds
  the control round trips;

for ``squeeze_wake`` on (blkback) and off (the kernel's lazy squeeze, which waits for each
ring's next idle pass, up to ``lru_interval_ms``, and misses rings whose pass falls after the
window).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from blkback.clients import HOLD_SCRIPT, libnbd_python
from blkback.clock import NS_PER_MS, NS_PER_S, Clock, MonotonicClock
from blkback.errors import EnvironmentProblem
from blkback.server.control_client import ControlClient

POLL_NS = 2 * NS_PER_MS  # how often the benchmark asks the server for its pools
SETTLE_NS = 50 * NS_PER_MS  # for every ring to be back in its blocking wait


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the benchmark's options."""
    parser.add_argument("--connections", type=int, default=64, help="idle rings (default 64)")
    parser.add_argument("--fill-mib", type=int, default=4, help="pool fill per ring (default 4)")
    parser.add_argument("--reports", type=int, default=30, help="reports per mode (default 30)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print its figures."""
    return run_cli(args.connections, args.fill_mib, args.reports, args.json)


def _wait_pools(
    clock: Clock, control: ControlClient, pred: Callable[[list[int]], bool], timeout_ns: int
) -> bool:
    """Poll the pools every :data:`POLL_NS` until ``pred(pools)`` (True) or the timeout."""
    deadline = clock.now_ns() + timeout_ns
    while clock.now_ns() < deadline:
        if pred(control.pool_pages()):
            return True
        clock.wait_until(min(deadline, clock.now_ns() + POLL_NS))
    return False


def _all_empty(pools: list[int]) -> bool:
    return max(pools) == 0


def _all_hold(pages: int, pools: list[int]) -> bool:
    return min(pools) >= pages


@contextlib.contextmanager
def _server(workdir: Path, n: int, params: list[str]) -> Iterator[tuple[str, str]]:
    sock = str(workdir / "nbd.sock")
    control = str(workdir / "ctl.sock")
    cmd = [sys.executable, "-m", "blkback", "serve", "--listen", f"unix:{sock}"]
    cmd += ["--control", control, "--pressure", "off"]
    for i in range(n):
        cmd += ["--export", f"v{i}=null:1G"]
    for p in params:
        cmd += ["--param", p]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise EnvironmentProblem(
                f"blkback serve did not start: {proc.stderr.read() if proc.stderr else ''}"
            )
        while not line.startswith("control:"):
            line = proc.stdout.readline()
        yield sock, control
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def measure(
    connections: int = 64, fill_bytes: int = 4 << 20, reports: int = 30, lru_interval_ms: int = 100
) -> dict[str, Any]:
    """Run the benchmark for squeeze_wake on and off; return the figures."""
    clock = MonotonicClock()
    results: dict[str, Any] = {
        "connections": connections,
        "fill_pages_per_ring": fill_bytes // 4096,
        "reports": reports,
        "lru_interval_ms": lru_interval_ms,
    }
    for wake in (1, 0):
        with tempfile.TemporaryDirectory(prefix="blkback-latency-") as tmp:
            params = [f"squeeze_wake={wake}", f"lru_interval_ms={lru_interval_ms}"]
            with _server(Path(tmp), connections, params) as (sock, control_path):
                control = ControlClient(control_path)
                uris = ",".join(f"nbd+unix:///v{i}?socket={sock}" for i in range(connections))
                hold = subprocess.Popen(
                    [libnbd_python(), HOLD_SCRIPT, uris, "1"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert hold.stdin is not None and hold.stdout is not None
                try:
                    if hold.stdout.readline().strip() != "ready":
                        raise EnvironmentProblem("the libnbd client could not connect")
                    observed: list[float] = []
                    missed = 0
                    for _ in range(reports):
                        hold.stdin.write(f"write {fill_bytes}\n")
                        hold.stdin.flush()
                        assert hold.stdout.readline().strip() == "ok"
                        full = min(fill_bytes // 4096, 1024)
                        _wait_pools(
                            clock, control, functools.partial(_all_hold, full), 2 * NS_PER_S
                        )
                        clock.wait_until(clock.now_ns() + SETTLE_NS)  # idle rings
                        t0 = clock.now_ns()
                        control.report_pressure("critical")
                        timeout_ns = NS_PER_S + 2 * lru_interval_ms * NS_PER_MS
                        if _wait_pools(clock, control, _all_empty, timeout_ns):
                            observed.append((clock.now_ns() - t0) / NS_PER_MS)
                        else:
                            missed += 1
                    stats = control.stats()
                finally:
                    hold.stdin.close()
                    hold.wait(30)
                    hold.stdout.close()
            key = "wake" if wake else "lazy"
            results[key] = {
                "in_server_ms": stats["pressure"]["squeeze_latency_ms"],
                "observed_ms": _quantiles(observed),
                "reports_where_some_ring_kept_its_pool": missed,
            }
    return results


def _quantiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    v = sorted(values)
    return {
        "count": len(v),
        "p50": round(statistics.median(v), 2),
        "p99": round(v[min(len(v) - 1, int(0.99 * len(v)))], 2),
        "max": round(v[-1], 2),
    }


def run_cli(connections: int, fill_mib: int, reports: int, as_json: bool) -> int:
    """Entry point of ``blkback pressure latency``."""
    if not os.path.exists(libnbd_python()):
        raise EnvironmentProblem("python3-libnbd is needed for the benchmark's clients")
    res = measure(connections, fill_mib << 20, reports)
    if as_json:
        print(json.dumps(res, indent=2))
        return 0
    print(
        f"{connections} idle rings, {res['fill_pages_per_ring']} pool pages each, {reports} reports"
    )
    for key in ("wake", "lazy"):
        r = res[key]
        ins = r["in_server_ms"]
        obs = r["observed_ms"]
        ins_text = (
            f"p50 {ins['p50']:.2f} p99 {ins['p99']:.2f} max {ins['max']:.2f} ms"
            if ins.get("count")
            else "n/a (no woken passes)"
        )
        obs_text = (
            f"p50 {obs['p50']:.1f} p99 {obs['p99']:.1f} max {obs['max']:.1f} ms"
            if obs.get("count")
            else "never"
        )
        print(
            f"squeeze_wake={'1' if key == 'wake' else '0'}: report -> all pools 0 in-server "
            f"{ins_text}; observed via ctl {obs_text}; "
            f"reports that left pools behind {r['reports_where_some_ring_kept_its_pool']}"
        )
    return 0
