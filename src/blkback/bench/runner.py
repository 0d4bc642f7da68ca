"""The bench schedule: servers interleaved cell by cell, the whole matrix repeated.

One repeat starts every selected server (fresh process, fresh export), pre-fills the fio region
of each with one sequential write pass (so reads return written data, not holes), then runs
every workload on every server in turn: ``w1:A B C, w2:A B C, ...``. The server order rotates by
one from repeat to repeat, so no server always runs right after the same neighbour. Slow drift
of the machine (thermal, page cache, other tenants) therefore hits all servers alike, and the
report takes the median over repeats.

Inside one cell, fio runs time-based with a ramp. The bench samples the server at two instants
inside fio's measured window (``ramp + margin`` and ``ramp + runtime - margin`` after fio
started): the server's CPU time from ``/proc/PID/stat`` and, for blkback, ``ctl stats`` (pool
pages allocated, requests served). The deltas between the two samples are the cell's server CPU
and allocation figures; fio and the server share the machine's cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blkback.bench.fio import FioOutputError, FioResult, fio_argv, parse_fio_json, prefill_argv
from blkback.bench.servers import (
    SERVERS,
    BenchError,
    RunningServer,
    ServerSpec,
    host_cpu_jiffies,
    start_server,
)
from blkback.bench.workloads import GIB, PRICE_WORKLOADS, WORKLOADS, Workload
from blkback.clock import NS_PER_S, MonotonicClock

Progress = Callable[[str], None]

#: The request counters of a ring's ``requests`` dict (the rest are bytes and loop passes).
REQUEST_KEYS: tuple[str, ...] = ("rd", "wr", "f", "ds", "other")

#: Seconds after fio's ramp ends before the first sample, and before fio's end for the last.
START_MARGIN_S = 0.25
END_MARGIN_S = 0.15


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Everything that defines one bench run."""

    servers: tuple[str, ...]
    workloads: tuple[str, ...]
    price_workloads: tuple[str, ...] = PRICE_WORKLOADS
    repeat: int = 3
    runtime_s: float = 5.0
    ramp_s: float = 1.0
    size_bytes: int = GIB
    export_size_bytes: int = GIB
    tmpfs_dir: str = "/dev/shm"
    quick: bool = False

    def order(self, repeat: int) -> tuple[str, ...]:
        """Server order in ``repeat``: the configured order rotated by ``repeat``."""
        shift = repeat % len(self.servers)
        return self.servers[shift:] + self.servers[:shift]

    def cells(self, repeat: int) -> list[tuple[str, str]]:
        """The ``(workload, server)`` pairs of one repeat, in run order."""
        out = []
        for w in self.workloads:
            for s in self.order(repeat):
                if SERVERS[s].price_only and w not in self.price_workloads:
                    continue
                out.append((w, s))
        return out

    def estimated_seconds(self) -> float:
        """A rough duration: per cell fio's ramp+runtime plus ~0.4 s, per server ~1.5 s."""
        per_repeat = len(self.cells(0)) * (self.ramp_s + self.runtime_s + 0.4)
        per_repeat += len(self.servers) * (1.5 + self.size_bytes / 1.5e9)
        return per_repeat * self.repeat


@dataclass
class Sample:
    """The server's counters at one instant."""

    t_ns: int
    cpu_s: float
    host: tuple[int, int]
    stats: dict[str, Any] | None = None


@dataclass
class CellResult:
    """One (repeat, workload, server) measurement; ``error`` is set when it failed."""

    repeat: int
    workload: str
    server: str
    error: str | None = None
    fio: dict[str, Any] | None = None
    window_s: float | None = None
    server_cpu_s: float | None = None
    server_cpu_pct: float | None = None
    server_us_per_op: float | None = None
    host_busy_pct: float | None = None
    pages_allocated: int | None = None
    pages_freed: int | None = None
    requests: int | None = None
    allocs_per_request: float | None = None
    pool_pages_end: int | None = None
    peak_pool_pages: int | None = None
    squeezed: bool | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True if fio ran without error and did I/O."""
        return self.error is None and self.fio is not None and self.fio["total_ios"] > 0


@dataclass
class BenchResults:
    """Everything a run produced: config, environment, every cell, server notes."""

    config: BenchConfig
    environment: dict[str, Any]
    cells: list[CellResult] = field(default_factory=list)
    server_notes: dict[str, list[str]] = field(default_factory=dict)
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "config": asdict(self.config),
            "environment": self.environment,
            "wall_s": self.wall_s,
            "server_notes": self.server_notes,
            "cells": [asdict(c) for c in self.cells],
        }


def _ring_counters(stats: dict[str, Any]) -> dict[tuple[str, str], dict[str, int]]:
    out: dict[tuple[str, str], dict[str, int]] = {}
    for dev in stats.get("devices", []):
        for ring in dev.get("rings", []):
            reqs = ring.get("requests") or {}
            out[(str(dev.get("name")), str(ring.get("id")))] = {
                "pages_allocated": int(ring.get("pages_allocated", 0)),
                "pages_freed": int(ring.get("pages_freed", 0)),
                "requests": sum(int(reqs.get(k, 0)) for k in REQUEST_KEYS),
                "pool_pages": int(ring.get("pool_pages", 0)),
                "peak_pool_pages": int(ring.get("peak_pool_pages", 0)),
            }
    return out


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Sum over devices and rings of the counter increments between two ``ctl stats``.

    A ring that appears only in ``after`` counts from zero (a new connection); one that
    disappeared is ignored (its connection closed, its counters are gone).
    """
    b, a = _ring_counters(before), _ring_counters(after)
    total = {"pages_allocated": 0, "pages_freed": 0, "requests": 0}
    for key, now in a.items():
        then = b.get(key, {})
        for name in total:
            total[name] += now[name] - then.get(name, 0)
    total["pool_pages"] = sum(r["pool_pages"] for r in a.values())
    total["peak_pool_pages"] = max((r["peak_pool_pages"] for r in a.values()), default=0)
    return total


def _squeezed(stats: dict[str, Any]) -> bool:
    devices = stats.get("devices", [])
    return bool(devices) and all(
        d.get("squeezed", d.get("squeeze_end_ms") is not None) for d in devices
    )


CLOCK = MonotonicClock()  # fio runs in real time: the schedule of samples does too


def _ns(seconds: float) -> int:
    return round(seconds * NS_PER_S)


def _sample(server: RunningServer, with_stats: bool) -> Sample:
    stats = server.stats() if with_stats else None
    return Sample(CLOCK.now_ns(), server.cpu_seconds(), host_cpu_jiffies(), stats)


def run_cell(
    server: RunningServer,
    workload: Workload,
    config: BenchConfig,
    workdir: Path,
    repeat: int,
) -> CellResult:
    """Run fio once against ``server`` and sample the server inside the measured window."""
    cell = CellResult(repeat, workload.name, server.spec.name)
    out = workdir / f"fio-{repeat}-{workload.name}-{server.spec.name}.json"
    argv = fio_argv(
        server.uri,
        workload,
        size_bytes=config.size_bytes,
        runtime_s=config.runtime_s,
        ramp_s=config.ramp_s,
        output=out,
    )
    is_blkback = server.spec.kind == "blkback"
    t0 = CLOCK.now_ns()
    fio = subprocess.Popen(
        argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    first: Sample | None = None
    last: Sample | None = None
    try:
        if server.spec.pressure:
            # A device may only exist once a client is connected: make sure the squeeze holds
            # for this connection before the measured window opens.
            CLOCK.wait_until(t0 + _ns(config.ramp_s / 2))
            if not _squeezed(server.stats()):
                server.ctl("pressure")
                cell.notes.append("pressure re-sent: device was not squeezed after connect")
        CLOCK.wait_until(t0 + _ns(config.ramp_s + START_MARGIN_S))
        if fio.poll() is None:
            t_ask = CLOCK.now_ns()
            first = _sample(server, is_blkback)
            # The second sample must land before fio stops: start it earlier by what one costs.
            cost = first.t_ns - t_ask
            end = t0 + _ns(config.ramp_s + config.runtime_s - END_MARGIN_S)
            CLOCK.wait_until(end - cost)
            if fio.poll() is None:
                last = _sample(server, is_blkback)
    except BenchError as exc:
        cell.error = str(exc)
    except BaseException:  # interrupted: leave no fio behind (it is our child)
        fio.kill()
        fio.wait()
        raise
    try:
        _, stderr = fio.communicate(timeout=config.ramp_s + config.runtime_s + 60)
    except subprocess.TimeoutExpired:
        fio.kill()
        _, stderr = fio.communicate()
        cell.error = cell.error or "fio did not finish in time (killed)"
    if fio.returncode != 0:
        msg = stderr.decode(errors="replace").strip()[-500:]
        cell.error = cell.error or f"fio exited with {fio.returncode}: {msg}"
    if not server.alive():
        cell.error = cell.error or f"server exited ({server.proc.returncode}): {server.log_tail()}"
    if cell.error is None:
        try:
            res: FioResult = parse_fio_json(out.read_text(), workload.direction)
        except (OSError, FioOutputError) as exc:
            cell.error = f"fio output: {exc}"
        else:
            cell.fio = asdict(res)
            if res.error:
                cell.error = f"fio reported error {res.error}"
            elif res.total_ios == 0:
                cell.error = "fio did no I/O"
    if cell.error is None and first is not None and last is not None:
        _account(cell, first, last)
    elif cell.error is None:
        cell.notes.append("fio ended before the server could be sampled (runtime too short?)")
    return cell


def _account(cell: CellResult, first: Sample, last: Sample) -> None:
    assert cell.fio is not None
    window = (last.t_ns - first.t_ns) / NS_PER_S
    cpu = last.cpu_s - first.cpu_s
    cell.window_s = window
    cell.server_cpu_s = cpu
    if window > 0:
        cell.server_cpu_pct = 100.0 * cpu / window
        ops = cell.fio["iops"] * window
        if ops > 0:
            cell.server_us_per_op = cpu / ops * 1e6
    busy, total = (last.host[0] - first.host[0]), (last.host[1] - first.host[1])
    if total > 0:
        # Percent of one CPU, like server and fio CPU: the machine's cores are shared with
        # anything else that runs, and this shows it (host busy - server - fio = others).
        cell.host_busy_pct = 100.0 * (os.cpu_count() or 1) * busy / total
    if first.stats is not None and last.stats is not None:
        d = stats_delta(first.stats, last.stats)
        cell.pages_allocated = d["pages_allocated"]
        cell.pages_freed = d["pages_freed"]
        cell.requests = d["requests"]
        cell.pool_pages_end = d["pool_pages"]
        cell.peak_pool_pages = d["peak_pool_pages"]
        if d["requests"] > 0:
            cell.allocs_per_request = d["pages_allocated"] / d["requests"]
        cell.squeezed = _squeezed(last.stats)


def prefill(server: RunningServer, config: BenchConfig, workdir: Path) -> None:
    """Write the whole fio region once (1 MiB, QD16), so reads see data, not holes."""
    out = workdir / f"prefill-{server.spec.name}.json"
    argv = prefill_argv(server.uri, size_bytes=config.size_bytes, output=out)
    res = subprocess.run(argv, cwd=workdir, capture_output=True, timeout=600, check=False)
    if res.returncode != 0:
        raise BenchError(
            f"{server.spec.name}: prefill failed (fio rc {res.returncode}): "
            f"{res.stderr.decode(errors='replace').strip()[-500:]}\n{server.log_tail()}"
        )


def tool_versions() -> dict[str, str]:
    """First line of ``--version`` of fio, nbdkit and qemu-nbd (or why it is missing)."""
    out = {}
    for tool in ("fio", "nbdkit", "qemu-nbd"):
        try:
            res = subprocess.run(
                [tool, "--version"], capture_output=True, timeout=10, check=False, text=True
            )
            out[tool] = (res.stdout or res.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired) as exc:
            out[tool] = f"unavailable: {exc}"
    return out


def check_tools(servers: tuple[str, ...]) -> None:
    """Raise BenchError naming any missing program the selected servers need."""
    needed = {"fio"}
    for s in servers:
        kind = SERVERS[s].kind
        if kind != "blkback":
            needed.add(kind)
    missing = sorted(t for t in needed if shutil.which(t) is None)
    if missing:
        raise BenchError(f"missing programs: {', '.join(missing)} (run scripts/setup)")


def run_bench(
    config: BenchConfig, environment: dict[str, Any], progress: Progress | None = None
) -> BenchResults:
    """Run every repeat of the matrix and return all cells (failed cells included)."""
    say = progress or (lambda _msg: None)
    check_tools(config.servers)
    results = BenchResults(config, environment)
    t_start = CLOCK.now_ns()
    total = sum(len(config.cells(r)) for r in range(config.repeat))
    done = 0
    with tempfile.TemporaryDirectory(prefix="blkback-bench-") as tmp:
        for r in range(config.repeat):
            workdir = Path(tmp) / f"r{r}"
            workdir.mkdir()
            running: dict[str, RunningServer] = {}
            try:
                for name in config.order(r):
                    spec: ServerSpec = SERVERS[name]
                    running[name] = start_server(
                        spec,
                        workdir,
                        export_size_bytes=config.export_size_bytes,
                        tmpfs_dir=Path(config.tmpfs_dir),
                    )
                    prefill(running[name], config, workdir)
                for w, s in config.cells(r):
                    cell = run_cell(running[s], WORKLOADS[w], config, workdir, r)
                    results.cells.append(cell)
                    done += 1
                    elapsed_s = (CLOCK.now_ns() - t_start) / NS_PER_S
                    say(_progress_line(cell, done, total, elapsed_s))
            finally:
                for name, srv in running.items():
                    rc = srv.stop()
                    notes = results.server_notes.setdefault(name, [])
                    notes.extend(srv.notes)
                    if rc not in (0, -15):
                        notes.append(f"repeat {r}: exit status {rc} after SIGTERM")
    results.wall_s = (CLOCK.now_ns() - t_start) / NS_PER_S
    return results


def _progress_line(cell: CellResult, done: int, total: int, elapsed_s: float) -> str:
    head = (
        f"[{done}/{total} {elapsed_s:4.0f}s] r{cell.repeat} {cell.workload:16s} {cell.server:16s}"
    )
    if not cell.ok or cell.fio is None:
        return f"{head} FAILED: {(cell.error or '').splitlines()[0] if cell.error else '?'}"
    mbs = cell.fio["bw_bytes_per_s"] / 1e6
    cpu = "" if cell.server_us_per_op is None else f" {cell.server_us_per_op:5.1f} us/op"
    return f"{head} {mbs:8.1f} MB/s {cell.fio['iops'] / 1e3:7.1f} kIOPS{cpu}"
