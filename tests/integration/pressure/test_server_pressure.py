"""The running server hears real memory pressure by itself and squeezes its pools (issue 4).

``blkback serve`` starts inside a memory-limited cgroup v1 child with swap (a wrapper joins
the cgroup before exec, so the server's own vmpressure registration watches that cgroup).
A libnbd client outside the cgroup fills three rings' pools to 16 MiB each with real NBD
writes; then an anonymous-memory hog in the same cgroup creates pressure. Nobody calls
``ctl pressure``: the server's monitor must detect it, squeeze, and the server's anonymous
footprint must fall. With ``buffer_squeeze_duration_ms=0`` the pools must stay.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from support import (
    blkback_cmd,
    child_env,
    export_name,
    raw_write,
    sampling_parked,
    start_handshake,
    wait_for_socket,
    wait_until,
)

from blkback.clients import HOLD_SCRIPT, libnbd_python
from blkback.hostenv.cgroup import MemoryCgroup
from blkback.hostenv.hog import MemoryHog
from blkback.hostenv.procfs import process_memory
from blkback.server.control_client import request

pytestmark = pytest.mark.root

MIB = 1 << 20
RINGS = 3
POOL_PAGES = 4096  # 16 MiB per ring, 48 MiB in all


def _footprint(pid: int) -> int:
    mem = process_memory(pid)
    return mem["RssAnon"] + mem.get("VmSwap", 0)


def _run(cgroup: MemoryCgroup, tmp: Path, duration_ms: int) -> dict[str, Any]:
    sock, control = str(tmp / "nbd.sock"), str(tmp / "ctl.sock")
    cmd = blkback_cmd("serve", "--listen", f"unix:{sock}", "--control", control)
    for i in range(RINGS):
        cmd += ["--export", f"v{i}=null:1G"]
    cmd += ["--param", f"max_buffer_pages={POOL_PAGES}"]
    cmd += ["--param", f"buffer_squeeze_duration_ms={duration_ms}"]
    procs = os.path.join(cgroup.path, "cgroup.procs")
    wrapper = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]
    server = subprocess.Popen(
        wrapper, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env()
    )
    holder = None
    try:
        wait_for_socket(control, server)
        uris = ",".join(f"nbd+unix:///v{i}?socket={sock}" for i in range(RINGS))
        holder = subprocess.Popen(
            [libnbd_python(), HOLD_SCRIPT, uris, "1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdin is not None and holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        holder.stdin.write(f"write {POOL_PAGES * 4096}\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "ok"

        def pools() -> list[int]:
            st = request(control, {"op": "stats"})
            return [r["pool_pages"] for d in st["devices"] for r in d["rings"]]

        wait_until(lambda: pools() == [POOL_PAGES] * RINGS, 20, "full pools")
        before = _footprint(server.pid)
        with MemoryHog(160, cgroup=cgroup):
            if duration_ms:
                wait_until(lambda: pools() == [0] * RINGS, 20, "the squeeze")
                time.sleep(1.0)
            else:
                # Nothing may be squeezed; first prove the cause arrived: a report reached
                # every device, and every ring ran the pass it woke (squeeze_wake=1).
                wait_until(lambda: _reports_reached_every_ring(control), 20, "the woken passes")
            stats = request(control, {"op": "stats"})
            after = _footprint(server.pid)
        return {"before": before, "after": after, "stats": stats, "pools": pools()}
    finally:
        if holder is not None:
            if holder.stdin is not None:
                holder.stdin.close()
            holder.wait(10)
            if holder.stdout is not None:
                holder.stdout.close()
        server.terminate()
        server.communicate(timeout=30)


def _reports_reached_every_ring(control: str) -> bool:
    stats = request(control, {"op": "stats"})
    devices = stats["devices"]
    return stats["pressure"]["reports"] > 0 and all(
        d["reclaims"] > 0 and all(r["requests"]["woken_passes"] > 0 for r in d["rings"])
        for d in devices
    )


def _detected_by_kernel_signals(stats: dict[str, Any]) -> int:
    events = stats["pressure"]["events"]
    assert not any(k.startswith("manual") for k in events), events
    return sum(events.values())


def test_server_detects_pressure_and_squeezes(
    pressure_cgroup: MemoryCgroup, tmp_path: Path
) -> None:
    res = _run(pressure_cgroup, tmp_path, duration_ms=10)
    assert res["pools"] == [0] * RINGS
    assert _detected_by_kernel_signals(res["stats"]) > 0
    rings = [r for d in res["stats"]["devices"] for r in d["rings"]]
    assert all(r["requests"]["pages_squeezed"] >= POOL_PAGES for r in rings)
    released = res["before"] - res["after"]
    assert released >= 0.75 * RINGS * POOL_PAGES * 4096, (res["before"], res["after"])


def test_squeeze_disabled_keeps_pools_under_pressure(
    pressure_cgroup: MemoryCgroup, tmp_path: Path
) -> None:
    res = _run(pressure_cgroup, tmp_path, duration_ms=0)
    assert _detected_by_kernel_signals(res["stats"]) > 0  # the pressure was heard...
    assert res["pools"] == [POOL_PAGES] * RINGS  # ...and nothing was squeezed
    assert res["after"] >= 0.9 * res["before"]


def test_a_single_client_server_squeezes_with_its_quiet_sampling_parked(
    pressure_cgroup: MemoryCgroup, tmp_path: Path
) -> None:
    # serve --single (one process per client) stops sampling the PSI totals while quiet,
    # leaving detection to the sources the kernel wakes us for (vmpressure on this cgroup,
    # PSI triggers): pressure must still squeeze its pool, as a daemon's would.
    control = str(tmp_path / "ctl.sock")
    cmd = blkback_cmd(
        "serve", "--single", "--export", "d=null:1G", "--control", control,
        "--param", f"max_buffer_pages={POOL_PAGES}",
    )  # fmt: skip
    procs = os.path.join(pressure_cgroup.path, "cgroup.procs")
    ours, theirs = socket.socketpair()
    with ours:
        with theirs:
            server = subprocess.Popen(
                ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd],
                stdin=theirs, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                env=child_env(),
            )  # fmt: skip
        try:
            ours.settimeout(30)
            start_handshake(ours)
            export_name(ours, b"")
            raw_write(ours, 0, bytes(2048 * 4096))  # its 2048 pages stay in the pool after it

            def pools() -> list[int]:
                stats = request(control, {"op": "stats"})
                return [r["pool_pages"] for d in stats["devices"] for r in d["rings"]]

            wait_until(
                lambda: pools() == [2048] and sampling_parked(control),
                20,
                "a full pool, sampling parked",
            )
            with MemoryHog(160, cgroup=pressure_cgroup):
                wait_until(lambda: pools() == [0], 20, "the squeeze")
            stats = request(control, {"op": "stats"})
            assert _detected_by_kernel_signals(stats) > 0
        finally:
            ours.close()
            server.communicate(timeout=30)
    assert server.returncode == 0
