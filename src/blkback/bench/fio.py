"""fio's command line for one cell, and the numbers we keep from its JSON output.

fio (3.33) runs with ``--ioengine=nbd``: libnbd's asynchronous API, so ``--iodepth`` really
keeps that many requests in flight on one connection. ``--lat_percentiles=1`` makes fio report
percentiles of the total latency (``lat_ns``: submission to completion) besides ``clat_ns``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blkback.bench.workloads import Workload


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def fio_argv(
    uri: str,
    workload: Workload,
    *,
    size_bytes: int,
    runtime_s: float,
    ramp_s: float,
    output: Path,
    fio: str = "fio",
) -> list[str]:
    """The fio command for one time-based measured cell, writing JSON to ``output``."""
    return [
        fio,
        "--name=cell",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={workload.rw}",
        f"--bs={workload.bs_bytes}",
        f"--iodepth={workload.iodepth}",
        f"--size={size_bytes}",
        "--time_based",
        f"--runtime={_ms(runtime_s)}",
        f"--ramp_time={_ms(ramp_s)}",
        "--lat_percentiles=1",
        "--output-format=json",
        f"--output={output}",
    ]


def prefill_argv(uri: str, *, size_bytes: int, output: Path, fio: str = "fio") -> list[str]:
    """One sequential 1 MiB QD16 pass over the region, so reads find written data."""
    return [
        fio,
        "--name=prefill",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=write",
        "--bs=1M",
        "--iodepth=16",
        f"--size={size_bytes}",
        "--output-format=json",
        f"--output={output}",
    ]


@dataclass(frozen=True, slots=True)
class FioResult:
    """The numbers of one fio run, for the workload's direction (read or write)."""

    bw_bytes_per_s: float
    iops: float
    total_ios: int
    runtime_ms: int
    lat_mean_ns: float
    lat_p99_ns: float
    clat_mean_ns: float
    clat_p99_ns: float
    client_cpu_pct: float  # fio's own usr+sys, percent of one CPU
    error: int


def _p99(section: dict[str, Any]) -> float:
    pct = section.get("percentile") or {}
    for key in ("99.000000", "99.00", "99"):
        if key in pct:
            return float(pct[key])
    return float("nan")


class FioOutputError(ValueError):
    """fio's output could not be read as the JSON of one job."""


def parse_fio_json(text: str, direction: str) -> FioResult:
    """Extract a :class:`FioResult` from fio's ``--output-format=json`` text.

    fio may print warnings before the JSON object; everything before the first ``{`` is skipped.
    """
    start = text.find("{")
    if start < 0:
        raise FioOutputError("no JSON object in fio output")
    try:
        doc = json.loads(text[start:])
        job = doc["jobs"][0]
        sec = job[direction]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise FioOutputError(f"unexpected fio JSON: {exc}") from exc
    lat = sec.get("lat_ns") or {}
    clat = sec.get("clat_ns") or {}
    return FioResult(
        bw_bytes_per_s=float(sec.get("bw_bytes", 0)),
        iops=float(sec.get("iops", 0.0)),
        total_ios=int(sec.get("total_ios", 0)),
        runtime_ms=int(sec.get("runtime", 0)),
        lat_mean_ns=float(lat.get("mean", float("nan"))),
        lat_p99_ns=_p99(lat),
        clat_mean_ns=float(clat.get("mean", float("nan"))),
        clat_p99_ns=_p99(clat),
        client_cpu_pct=float(job.get("usr_cpu", 0.0)) + float(job.get("sys_cpu", 0.0)),
        error=int(job.get("error", 0)),
    )
