"""How fast a pressure report empties every idle ring: the squeeze latency benchmark.

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

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from blkback.clients import HOLD_SCRIPT, libnbd_python
from blkback.errors import EnvironmentProblem
from blkback.server.ctl_command import request


def _pools(control: str) -> list[int]:
    stats = request(control, {"op": "stats"})
    return [r["pool_pages"] for d in stats["devices"] for r in d["rings"]]


def _wait(pred: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.002)
    return False


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
    results: dict[str, Any] = {
        "connections": connections,
        "fill_pages_per_ring": fill_bytes // 4096,
        "reports": reports,
        "lru_interval_ms": lru_interval_ms,
    }
    for wake in (1, 0):
        with tempfile.TemporaryDirectory(prefix="blkback-latency-") as tmp:
            params = [f"squeeze_wake={wake}", f"lru_interval_ms={lru_interval_ms}"]
            with _server(Path(tmp), connections, params) as (sock, control):
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
                        _wait(lambda f=full: min(_pools(control)) >= f, 2.0)
                        time.sleep(0.05)  # idle rings: every ring back in its blocking wait
                        t0 = time.monotonic()
                        request(control, {"op": "pressure", "level": "critical"})
                        if _wait(lambda: max(_pools(control)) == 0, 1.0 + lru_interval_ms / 500):
                            observed.append((time.monotonic() - t0) * 1000)
                        else:
                            missed += 1
                    stats = request(control, {"op": "stats"})
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
