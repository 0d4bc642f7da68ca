"""Parsers of the kernel's files, on literal samples and on this machine's real files."""

from __future__ import annotations

import os

import pytest

from blkback.core.policy import PressureLevel
from blkback.hostenv.procfs import parse_status, process_memory, read_vmstat, swap_counters
from blkback.hostenv.swap import active_swaps
from blkback.pressure.cgroups import (
    cap_effective,
    parse_mountinfo,
    parse_proc_cgroup,
    read_layout,
)
from blkback.pressure.psi import (
    UNPRIVILEGED_TRIGGERS,
    PsiThresholds,
    parse_psi,
    stall_fractions,
)
from blkback.pressure.sources import (
    AvailableThresholds,
    available_fraction,
    parse_meminfo,
    parse_memory_stat,
    read_psi,
)

PSI_TEXT = (
    "some avg10=1.50 avg60=0.25 avg300=0.05 total=123456\n"
    "full avg10=0.75 avg60=0.10 avg300=0.01 total=65432\n"
)


def test_parse_psi_sample() -> None:
    s = parse_psi(PSI_TEXT)
    assert s.some.total_us == 123456
    assert s.some.avg10 == 1.5
    assert s.full is not None
    assert s.full.total_us == 65432


def test_parse_psi_without_full_line() -> None:
    s = parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=7\n")
    assert s.full is None


@pytest.mark.parametrize(
    "bad", ["", "full avg10=0 avg60=0 avg300=0 total=1", "some avg10=x", "odd line"]
)
def test_parse_psi_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_psi(bad)


def test_parse_real_psi_file() -> None:
    if not os.path.exists("/proc/pressure/memory"):
        pytest.skip("kernel without PSI")
    s = read_psi("/proc/pressure/memory")
    assert s.some.total_us >= 0
    assert s.full is not None


def test_stall_fractions_and_levels() -> None:
    before = parse_psi(PSI_TEXT)
    after = parse_psi(
        "some avg10=0 avg60=0 avg300=0 total=128456\nfull avg10=0 avg60=0 avg300=0 total=65432\n"
    )
    some, full = stall_fractions(before, after, 50_000_000)  # 5 ms stall in 50 ms
    assert some == pytest.approx(0.10)
    assert full == 0
    t = PsiThresholds()
    assert t.level(some, full) == PressureLevel.MEDIUM
    assert t.level(0.01, 0) is None
    assert t.level(0.02, 0) == PressureLevel.LOW
    assert t.level(0.05, 0.10) == PressureLevel.CRITICAL
    assert t.level(0.40, 0) == PressureLevel.CRITICAL
    assert stall_fractions(before, after, 0) == (0.0, 0.0)


def test_unprivileged_triggers_follow_the_rules() -> None:
    for spec in UNPRIVILEGED_TRIGGERS:
        assert spec.window_us % 2_000_000 == 0
        assert spec.text().endswith(b"\0")
    assert UNPRIVILEGED_TRIGGERS[0].text() == b"some 70000 2000000\0"


HYBRID_CGROUP = """9:name=systemd:/
4:memory:/process_api/abc
1:cpu,cpuacct:/x
0::/
"""
MOUNTINFO = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/cpu\\040x rw,relatime - cgroup cgroup rw,cpu,cpuacct
"""


def test_parse_hybrid_layout() -> None:
    from blkback.pressure.cgroups import CgroupLayout

    v1, v2 = parse_proc_cgroup(HYBRID_CGROUP)
    assert v1["memory"] == "/process_api/abc"
    assert v1["cpuacct"] == "/x"
    assert v2 == "/"
    layout = CgroupLayout(parse_mountinfo(MOUNTINFO), v1, v2)
    assert layout.kind == "hybrid"
    assert layout.v1_dir("memory") == "/sys/fs/cgroup/memory/process_api/abc"
    assert layout.v1_dir("cpu") == "/sys/fs/cgroup/cpu x/x"
    assert layout.v2_dir() == "/sys/fs/cgroup/unified"
    assert layout.v1_dir("blkio") is None


def test_parse_v2_only_layout() -> None:
    from blkback.pressure.cgroups import CgroupLayout

    mounts = parse_mountinfo("30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    v1, v2 = parse_proc_cgroup("0::/user.slice/app.scope\n")
    layout = CgroupLayout(mounts, v1, v2)
    assert layout.kind == "v2"
    assert layout.v2_dir() == "/sys/fs/cgroup/user.slice/app.scope"
    assert layout.v1_dir("memory") is None


def test_real_layout() -> None:
    layout = read_layout()
    assert layout.kind in ("v1", "v2", "hybrid", "none")
    mem = layout.v1_dir("memory")
    if mem is not None:
        assert os.path.isdir(mem)
        with open(os.path.join(mem, "memory.stat")) as f:
            stat = parse_memory_stat(f.read())
        assert "rss" in stat or "anon" in stat


def test_cap_effective() -> None:
    assert cap_effective("Name:\tx\nCapEff:\t000001fffeffffff\n") >> 24 & 1 == 0
    assert cap_effective("CapEff:\t0000000001000000\n") >> 24 & 1 == 1
    assert cap_effective("") == 0


def test_meminfo_and_available_fraction() -> None:
    text = (
        "MemTotal:       1000 kB\nMemFree:  100 kB\nMemAvailable:    150 kB\nHugePages_Total: 0\n"
    )
    info = parse_meminfo(text)
    assert info["MemTotal"] == 1000 * 1024
    assert info["HugePages_Total"] == 0
    frac, where = available_fraction(text)
    assert frac == pytest.approx(0.15)
    assert where == "host"
    t = AvailableThresholds()
    assert t.level(0.15) == PressureLevel.LOW
    assert t.level(0.09) == PressureLevel.MEDIUM
    assert t.level(0.01) == PressureLevel.CRITICAL
    assert t.level(0.5) is None


def test_real_meminfo() -> None:
    with open("/proc/meminfo") as f:
        text = f.read()
    info = parse_meminfo(text)
    assert info["MemTotal"] > info["MemAvailable"] > 0
    frac, _ = available_fraction(text, read_layout().v1_dir("memory"))
    assert 0 <= frac <= 1


def test_procfs_readers() -> None:
    mem = process_memory()
    assert mem["VmRSS"] > 0
    assert "RssAnon" in mem
    assert parse_status("VmRSS:\t  12 kB\nName:\tx\n") == {"VmRSS": 12 * 1024}
    vm = read_vmstat()
    assert "pswpin" in vm
    c = swap_counters()
    assert (c - c).pswpout == 0
    for entry in active_swaps():
        assert entry["filename"]


def test_active_swaps_format(tmp_path: object) -> None:
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    p = tmp_path / "swaps"
    p.write_text(
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        "/var/tmp/swap                           file\t\t262140\t\t0\t\t-2\n"
    )
    assert active_swaps(str(p)) == [
        {
            "filename": "/var/tmp/swap",
            "type": "file",
            "size_kib": "262140",
            "used_kib": "0",
            "priority": "-2",
        }
    ]
    assert active_swaps(str(tmp_path / "missing")) == []
