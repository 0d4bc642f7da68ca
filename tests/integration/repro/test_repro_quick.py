"""``blkback repro all --quick`` end to end: real cgroup, swap, guests, ext4 under dd.

Twice: with real Linux VM guests (``--guests vm``: QEMU, virtio disks on blkback exports,
the dd loop inside a guest) and with libnbd guests on the host (``--guests nbd``: nbdfuse +
loop + ext4 for the dd loop).

Checks that the report and results.json are complete and sane, and the mechanism: without
the squeeze the idle pools stay at max_buffer_pages in every ring, with it pressure events
are seen, squeezes happen and the idle rings' pools go to 0. On swap counts it asserts only
what holds with a wide margin on this host (the quick full-table numbers are 20x-50x
apart): squeeze-on causes fewer than half the cgroup's major faults and anon refaults of
squeeze-off. It does not assert the 20x of the full run.

Needs root, cgroup v1 memory, swap (or swapon), libnbd for /usr/bin/python3, nbdfuse,
fuse3 and losetup: skips naming what is missing, fails instead under CI=true.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
REPRO = [sys.executable, "-m", "blkback", "repro"]


def _missing(guests: str) -> list[str]:
    from blkback.repro.testbed import missing_facilities
    from blkback.repro.vm import missing_vm_facilities

    return missing_facilities(need_overhead=True) + (
        missing_vm_facilities() if guests == "vm" else []
    )


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (QEMU has its sockets' paths)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(f"{pid}: {cmd[:120]}")
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _leftovers(results: dict[str, Any]) -> list[str]:
    """What this repro run made and did not remove: cgroups, swapfile, mounts, loops."""
    cfg = results["config"]
    out = []
    root = "/sys/fs/cgroup/memory"
    prefix = f"blkback-repro-{cfg['pid']}-"
    out += [d for d in os.listdir(root) if d.startswith(prefix)]
    swap = cfg.get("swap", {})
    if swap.get("created_swapfile"):
        with open("/proc/swaps") as f:
            active = f.read()
        out += [s["filename"] for s in swap["swaps"] if s["filename"] in active]
    work = cfg["workdir"]
    with open("/proc/mounts") as f:
        out += [ln.split()[1] for ln in f if work in ln]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False)
    out += [ln for ln in loops.stdout.splitlines() if work in ln]
    if os.path.exists(work):
        out.append(work)
    out += _processes_mentioning(work)  # VMs, servers, hogs, nbdfuse
    return out


def _require(guests: str) -> None:
    missing = _missing(guests)
    if missing:
        msg = "repro needs: " + "; ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.mark.parametrize("guests", ["vm", "nbd"])
def test_repro_quick(tmp_path: Path, guests: str) -> None:
    _require(guests)
    out = tmp_path / "out"
    proc = subprocess.run(
        [*REPRO, "all", "--quick", "--guests", guests, "--out", str(out)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=840,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = (out / "report.md").read_text()
    for heading in (
        "## 1. Memory pressure test",
        "## 2. Squeeze duration sweep",
        "## 3. Performance overhead",
        "## 4. Beyond the seed",
        "## Host noise",
    ):
        assert heading in report
    assert "76,672" in report and "185,799" in report  # the seed's table beside ours
    assert "records out" in report  # the dd lines, as the seed printed them
    for png in ("pools.png", "swaps.png", "dd.png"):
        assert (out / png).stat().st_size > 1000

    r = json.loads((out / "results.json").read_text())
    assert r["complete"] is True
    assert _leftovers(r) == [], "repro left cgroups, swap, mounts, loop devices or files"
    mp = r["memory_pressure"]
    for when in ("before", "after"):
        for k in ("pswpin", "pswpout"):
            assert isinstance(mp[when][k], int) and mp[when][k] >= 0
    for sweep in ("duration_sweep", "duration_sweep_kernel"):
        assert set(r[sweep]) == {"1", "10", "100"}
        for d in r[sweep].values():
            assert isinstance(d["pswpin"], int) and isinstance(d["pswpout"], int)
    g = r["config"]["guests"]
    assert g["kind"] == guests
    assert g["disks"] == r["config"]["sizing"]["devices"] >= 64
    assert r["overhead"]["where"] == ("vm" if guests == "vm" else "host")
    for kind in ("slow", "fast"):
        for setting in ("1024", "0"):
            runs = r["overhead"][kind][setting]
            assert len(runs) == r["config"]["overhead"]["runs"]
            assert all(x > 1.0 for x in runs)
    slow = r["overhead"]["median"]["slow"]
    assert 20 < slow["1024"] < 60  # the rate filter's ~40 MB/s volume
    assert r["config"]["sizing"]["devices"] >= 32
    assert "seed" in r["config"]

    per = r["configurations"]
    off, on = per["off"], per["10"]
    rings = off["rings"]
    assert rings == r["config"]["sizing"]["devices"] * r["config"]["sizing"]["connections"]
    # Without the squeeze every ring keeps its full pool while idle ...
    assert off["squeezes"] == 0 and off["pages_squeezed"] == 0
    assert off["pool_pages_max"] >= 0.9 * rings * 1024
    assert off["cgroup"]["max_swap_bytes"] > 0  # ... and dom0 swaps.
    # With it, pressure is detected, devices are squeezed, and idle rings drop to 0.
    assert on["pressure_events"] > 0 and on["squeezes"] > 0 and on["pages_squeezed"] > 0
    assert on["min_rings_holding_pages_after_first_squeeze"] < rings // 2
    # Swap, by the cgroup's own counters (host-wide vmstat may include other tenants).
    assert on["cgroup"]["pgmajfault"] * 2 < off["cgroup"]["pgmajfault"]
    assert on["cgroup"]["workingset_refault_anon"] * 2 < off["cgroup"]["workingset_refault_anon"]
    # The guests write real (random) data, so the pools' pages swap out as I/O, counted in
    # pswpout; zero pages would go to swpout_zero instead (kernels >= 6.12) and hide it.
    assert off["swpout_zero"] is None or off["pswpout"] > off["swpout_zero"]
    # The kernel-faithful sweep hears reclaim through the shrinker feed, nothing else.
    for k in ("k1", "k10", "k100"):
        run = per[k]["runs"][0]
        assert run["shrinker_feed"]["reports"] > 0 and run["shrinker_feed"]["errors"] == 0
        assert run["pressure_monitor"]["monitor"] is None  # server ran with --pressure off
        assert per[k]["squeezes"] > 0
    if guests == "vm":
        _check_vm_guests(r, report)


def _check_vm_guests(r: dict[str, Any], report: str) -> None:
    """The guests were VMs that did the work inside, and the report says so."""
    g = r["config"]["guests"]
    assert g["accel"] in ("kvm", "tcg") and g["accel_reason"]
    assert g["vms"] >= 2
    for conf in r["configurations"].values():
        for run in conf["runs"]:
            gr = run["guest"]
            assert gr["kind"] == "vm" and gr["vms"] == g["vms"]
            assert gr["connections"] == g["disks"]
            assert gr["errors"] == 0 and gr["bursts"] >= g["disks"]  # every disk wrote
            assert gr["burst_s_median"] is not None
            assert gr["data"].startswith("random") and gr["pattern_s"] > 0
    assert "Linux VMs" in report and g["accel"] in report
    # The guest's own dd lines (coreutils' format, as the seed's guest printed them).
    assert "bytes (" in report and ") copied, " in report
    raw = r["overhead"]["raw"]
    for kind in ("slow", "fast"):
        for setting in ("1024", "0"):
            for run in raw[kind]["runs"][setting]:
                assert run["dd_line"].startswith(f"{run['bytes']} bytes (")


def test_repro_vm_interrupted_leaves_nothing(tmp_path: Path) -> None:
    """Ctrl-C while the VM guests run: VMs, server, hog, cgroup, swap and files all go."""
    _require("vm")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*REPRO, "memory-pressure", "--quick", "--guests", "vm", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
    )
    try:
        workdir = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            found = [
                d
                for d in os.listdir("/tmp")
                if d.startswith("blkback-repro-") and _processes_mentioning(f"/tmp/{d}/mp/guest")
            ]
            qemu = [p for d in found for p in _processes_mentioning(f"/tmp/{d}/mp/guest")]
            if any("qemu-system" in p for p in qemu):
                workdir = f"/tmp/{found[0]}"
                break
            time.sleep(0.5)
        assert workdir is not None, "no VM guest started"
        time.sleep(3)  # let them boot a little
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert _processes_mentioning(workdir) == []
    assert not os.path.exists(workdir)
    root = "/sys/fs/cgroup/memory"
    assert [d for d in os.listdir(root) if d.startswith(f"blkback-repro-{proc.pid}-")] == []
