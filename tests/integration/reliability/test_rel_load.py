"""Load: 256 connections across 64 exports, QD16 each, mixed verified reads and writes, 60 s.

fio's nbd engine, one connection per job (64 sections x numjobs=4), each job on its own
1 MiB region of its export (``offset_increment``), random 4 KiB reads and writes with
crc32c verification of what was written (``verify_backlog``: written blocks are read back
and checked while the run goes on; ``verify_fatal``). The server's RSS is sampled all along.

RSS bound: baseline + connections x (max_buffer_pages + in-flight pages per ring) x 4 KiB
+ connections x (256 KiB staging + 256 KiB thread and bookkeeping) + the memory backend's
data (anonymous memory of the server, so in its RSS once written).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from rsupport import rss_kib
from support import need_tool, wait_until

EXPORTS = 64
JOBS_PER_EXPORT = 4
QD = 16
RUNTIME_S = 60
REGION = 1 << 20
EXPORT_SIZE = JOBS_PER_EXPORT * REGION
KiB = 1024


@pytest.mark.slow
def test_256_connections_64_exports_qd16_verified(serve, tmp_path: Path) -> None:
    need_tool("fio")
    s = serve(*(f"e{i}=memory:{EXPORT_SIZE // REGION}M" for i in range(EXPORTS)))
    pid = s.proc.pid
    time.sleep(0.5)
    baseline_kib = rss_kib(pid)
    params = s.stats()["params"]
    job = tmp_path / "load.fio"
    lines = [
        "[global]", "ioengine=nbd", "thread=1", "rw=randrw", "rwmixread=50", "bs=4k",
        f"iodepth={QD}", f"size={REGION}", f"offset_increment={REGION}",
        f"numjobs={JOBS_PER_EXPORT}", "verify=crc32c", "verify_backlog=64", "verify_fatal=1",
        "time_based=1", f"runtime={RUNTIME_S}", "group_reporting=1",
    ]  # fmt: skip
    for i in range(EXPORTS):
        lines += [f"[e{i}]", f"uri=nbd+unix:///e{i}?socket={s.sock}"]
    job.write_text("\n".join(lines) + "\n")
    out = tmp_path / "fio.json"
    samples: list[int] = []
    held: list[int] = []
    pools: list[int] = []
    in_flight: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            samples.append(rss_kib(pid))
            if len(samples) % 20 == 10:
                st = s.stats()
                held.append(st["server"]["connections"])
                rings = [r for d in st["devices"] for r in d["rings"]]
                pools.append(max((r["peak_pool_pages"] for r in rings), default=0))
                in_flight.append(sum(r["in_flight_pages"] for r in rings))

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            ["fio", str(job), "--output-format=json", f"--output={out}"],
            capture_output=True, text=True, timeout=RUNTIME_S + 120, cwd=tmp_path,
        )  # fmt: skip
    finally:
        stop.set()
        sampler.join()
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    report = json.loads(text[text.index("{") :])
    (j,) = report["jobs"]
    assert j["error"] == 0
    rd, wr = j["read"], j["write"]
    ios = rd["total_ios"] + wr["total_ios"]
    wait_until(lambda: s.stats()["server"]["connections"] == 0, 30, "connections to close")
    st = s.stats()
    # fio connects once to size each job, then for the I/O: two rings per job.
    assert st["server"]["retired_rings"]["rings"] >= EXPORTS * JOBS_PER_EXPORT
    assert st["server"]["retired_rings"]["pages_reclaimed"] == 0
    conns = EXPORTS * JOBS_PER_EXPORT
    per_ring_pages = params["max_buffer_pages"] + QD  # pool cap + in flight (4 KiB requests)
    data_kib = EXPORTS * EXPORT_SIZE // KiB
    bound_kib = baseline_kib + conns * (per_ring_pages * 4 + 256 + 256) + data_kib
    peak_kib = max(samples)
    peak_pool = max(pools, default=0)
    print(
        f"\n{conns} connections (held {max(held, default=0)}), {ios} I/Os in {RUNTIME_S} s "
        f"({took:.0f} s wall): {ios / RUNTIME_S:.0f} IOPS "
        f"(read {rd['iops']:.0f} incl. verify reads, write {wr['iops']:.0f}); "
        f"p99 clat read {rd['clat_ns']['percentile']['99.000000'] / 1e6:.2f} ms, "
        f"write {wr['clat_ns']['percentile']['99.000000'] / 1e6:.2f} ms; "
        f"RSS baseline {baseline_kib} KiB, peak {peak_kib} KiB, bound {bound_kib} KiB "
        f"(of which data up to {data_kib} KiB; peak pool per ring {peak_pool} pages, "
        f"max pages in flight at a sample {max(in_flight, default=0)})"
    )
    assert max(held, default=0) == conns
    assert peak_kib <= bound_kib
    assert ios > 100_000
