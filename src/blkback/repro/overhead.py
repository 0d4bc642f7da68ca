"""Experiment 3: the seed's ``dd`` loop on a guest filesystem, ``max_buffer_pages`` 1024 vs 0.

The guest's disk is a real block device backed by blkback: ``nbdfuse DIR --unix SOCK``
exposes the export as the file ``DIR/nbd``, ``losetup`` turns that into ``/dev/loopN``,
``mkfs.ext4`` and ``mount`` make the filesystem. The server and this guest stay OUTSIDE
the memory-limited cgroup: a same-host client of a server under reclaim can deadlock
(nbd-notes.md section 5.7). The backend is ``memory`` (it stores what ext4 writes, so the
filesystem reads back its metadata), with ``rate=40M`` for the emulated slow network volume
(the seed's ~40 MB/s) and without a filter for fast storage.

The loop is the seed's: ``for i in {1..5}; do dd if=/dev/zero of=file bs=4k
count=$((256*512)); sync; done``, with ``max_buffer_pages`` set to 1024 and then to 0 at run
time through the control socket, as the seed wrote the module parameter. Each run's ``dd``
line is kept verbatim. ``dd``'s own MB/s counts only the copy into the guest's page cache
(this host has GBs for it, the seed's guest had not), so the throughput that reaches the
volume is measured as bytes / (dd + sync) and is the one compared.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from blkback.clock import NS_PER_MS, NS_PER_S, Clock
from blkback.errors import EnvironmentProblem
from blkback.repro.testbed import CLOCK, ServerProcess, kill_pid, poll_until

DD_RE = re.compile(r"^(\d+) bytes .* copied, ([0-9.]+) s, ([0-9.]+) ([kMG]?B)/s", re.M)
UNIT = {"B": 1e-6, "kB": 1e-3, "MB": 1.0, "GB": 1e3}


@dataclass(frozen=True)
class OverheadPlan:
    """What the experiment runs, the same on the host (:func:`run_volume`) and in a VM guest
    (:func:`blkback.repro.vmoverhead.run_volumes_vm`)."""

    runs: int  # of the dd loop, per setting
    count: int  # dd's 4 KiB blocks per run
    size: str  # of each volume
    rate: str  # of the slow volume
    settings: tuple[int, ...] = (1024, 0)  # max_buffer_pages
    log: Any = None  # a line of the dd log
    on_step: Any = None  # a step of the progress bar
    clock: Clock = CLOCK

    def export(self, kind: str) -> str:
        """The volume's export spec: ``slow`` is rate-limited (the seed's ~40 MB/s), ``fast``
        is not."""
        return f"memory:{self.size}" + (f",rate={self.rate}" if kind == "slow" else "")

    def step(self, what: str) -> None:
        if self.on_step is not None:
            self.on_step(what)


def _run(argv: list[str], timeout: float = 300.0) -> str:
    tool = shutil.which(argv[0])
    if tool is None:
        raise EnvironmentProblem(f"{argv[0]} not found")
    p = subprocess.run(
        [tool, *argv[1:]], capture_output=True, text=True, timeout=timeout, check=False
    )
    if p.returncode != 0:
        raise EnvironmentProblem(f"{' '.join(argv)} failed: {(p.stderr or p.stdout).strip()}")
    return p.stdout


class GuestDisk:
    """nbdfuse + loop device + ext4 mount over one export; all undone by :meth:`close`."""

    def __init__(
        self, server: ServerProcess, export: str, workdir: Path, *, clock: Clock = CLOCK
    ) -> None:
        self.fuse_dir = workdir / "fuse"
        self.mnt = workdir / "mnt"
        self.fuse_dir.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.loop: str | None = None
        self.mounted = False
        self.fuse_mounted = False
        pidfile = workdir / "nbdfuse.pid"
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        uri = f"nbd+unix:///{export}?socket={server.sock}"
        self.fuse = subprocess.Popen(
            ["nbdfuse", "-P", str(pidfile), str(self.fuse_dir), uri],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            if not poll_until(
                lambda: self._fuse_started(pidfile),
                timeout_ns=30 * NS_PER_S,
                interval_ns=50 * NS_PER_MS,
                clock=clock,
            ):
                self._fuse_failed()
            self.fuse_mounted = True
            self.loop = _run(["losetup", "-f", "--show", str(self.fuse_dir / "nbd")]).strip()
            _run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0",
                    self.loop,
                ]
            )
            _run(["mount", self.loop, str(self.mnt)])
            self.mounted = True
        except BaseException:
            self.close()
            raise

    def _fuse_started(self, pidfile: Path) -> bool:
        """nbdfuse writes its PID file once the FUSE mount is up; an error if it exited."""
        if pidfile.exists() and pidfile.read_text().strip():
            return True
        if self.fuse.poll() is not None:
            self._fuse_failed()
        return False

    def _fuse_failed(self) -> NoReturn:
        err = self.fuse.stderr.read() if self.fuse.stderr else ""
        raise EnvironmentProblem(f"nbdfuse did not start: {err.strip()}")

    def close(self) -> None:
        """Unmount, detach the loop device, unmount FUSE, reap nbdfuse (by its PID)."""
        if self.mounted:
            subprocess.run(["sync"], check=False)
            r = subprocess.run(["umount", str(self.mnt)], capture_output=True, check=False)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, check=False)
            self.mounted = False
        if self.loop is not None:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True, check=False)
            self.loop = None
        if self.fuse_mounted:
            subprocess.run(
                ["fusermount3", "-u", str(self.fuse_dir)], capture_output=True, check=False
            )
            self.fuse_mounted = False
        try:
            self.fuse.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        kill_pid(self.fuse)


def dd_loop(
    mnt: Path, *, runs: int, count: int, log: Any = None, clock: Clock = CLOCK
) -> list[dict[str, Any]]:
    """The seed's loop; per run: dd's line, dd's MB/s, dd+sync seconds and MB/s."""
    out: list[dict[str, Any]] = []
    target = mnt / "file"
    for _ in range(runs):
        t0 = clock.now_ns()
        p = subprocess.run(
            ["dd", "if=/dev/zero", f"of={target}", "bs=4k", f"count={count}"],
            capture_output=True,
            text=True,
            check=False,
        )
        t1 = clock.now_ns()
        subprocess.run(["sync"], check=False)
        t2 = clock.now_ns()
        if p.returncode != 0:
            raise EnvironmentProblem(f"dd failed: {p.stderr.strip()}")
        run = dd_record(
            p.stderr.splitlines(),
            count * 4096,
            dd_wall_s=(t1 - t0) / NS_PER_S,
            total_s=(t2 - t0) / NS_PER_S,
        )
        if log is not None:
            log_dd(run, log)
        out.append(run)
    return out


def dd_record(
    output: list[str], nbytes: int, *, dd_wall_s: float, total_s: float
) -> dict[str, Any]:
    """One run of the loop: dd's lines as printed, dd's MB/s, and dd + sync's MB/s."""
    text = "\n".join(output)
    m = DD_RE.search(text)
    lines = [ln for ln in output if ln.strip()]
    return {
        "dd_output": lines,
        "dd_line": lines[-1] if lines else "",
        "bytes": nbytes,
        "dd_s": float(m.group(2)) if m else dd_wall_s,
        "dd_mb_s": float(m.group(3)) * UNIT[m.group(4)] if m else nbytes / 1e6 / dd_wall_s,
        "sync_s": total_s - dd_wall_s,
        "total_s": total_s,
        "mb_s": nbytes / 1e6 / total_s,
    }


def log_dd(run: dict[str, Any], log: Any) -> None:
    """dd's lines as the seed printed them, then this run's dd + sync figure."""
    for ln in run["dd_output"]:
        log(ln)
    log(f"  (dd+sync: {run['total_s']:.3f} s, {run['mb_s']:.1f} MB/s)")


def log_loop_header(kind: str, setting: int, runs: int, count: int, log: Any) -> None:
    """The two command lines the seed showed before each loop."""
    log(f"[dom0]# blkback ctl set max_buffer_pages {setting}   ({kind} volume)")
    log(
        f"[instance]$ for i in {{1..{runs}}}; do dd if=/dev/zero of=file bs=4k "
        f"count={count}; sync; done"
    )


def measure_setting(
    server: ServerProcess,
    plan: OverheadPlan,
    kind: str,
    setting: int,
    loop: Callable[[], list[dict[str, Any]]],
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One ``max_buffer_pages`` setting, on the host or in a VM: set it through the control
    socket as the seed wrote the module parameter, print the seed's command lines, run the
    ``loop``; returns its runs and what the pools did meanwhile."""
    server.set("max_buffer_pages", setting)
    if plan.log is not None:
        log_loop_header(kind, setting, plan.runs, plan.count, plan.log)
    before = pool_totals(server.stats())
    done = loop()
    after = pool_totals(server.stats())
    pools = {k: after[k] - before[k] for k in after} | {"pool_pages_end": after["pool_pages"]}
    return done, pools


def run_volume(kind: str, workdir: Path, plan: OverheadPlan) -> dict[str, Any]:
    """One volume (``slow`` with the rate filter or ``fast``): the dd loop per setting."""
    spec = plan.export(kind)
    wd = workdir / f"overhead-{kind}"
    wd.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"export": spec, "runs": {}, "pools": {}}
    clock = plan.clock
    server = ServerProcess(wd, [f"disk={spec}"], workers=16, pressure="off", tag="srv", clock=clock)
    try:
        disk = GuestDisk(server, "disk", wd, clock=clock)
        try:
            for setting in plan.settings:
                plan.step(f"overhead {kind}: max_buffer_pages={setting}")
                done, pools = measure_setting(
                    server,
                    plan,
                    kind,
                    setting,
                    lambda: dd_loop(
                        disk.mnt, runs=plan.runs, count=plan.count, log=plan.log, clock=clock
                    ),
                )
                result["runs"][str(setting)] = done
                result["pools"][str(setting)] = pools
                (disk.mnt / "file").unlink(missing_ok=True)
                subprocess.run(["sync"], check=False)
        finally:
            disk.close()
    finally:
        server.stop()
    return result


def pool_totals(stats: dict[str, Any]) -> dict[str, int]:
    rings = [r for d in stats["devices"] for r in d["rings"]]
    return {
        "pool_pages": sum(r["pool_pages"] for r in rings),
        "pages_allocated": sum(r["pages_allocated"] for r in rings),
        "pages_freed": sum(r["pages_freed"] for r in rings),
        "writes": sum(r.get("requests", {}).get("wr", 0) for r in rings),
    }


def leftover_mounts(workdir: Path) -> list[str]:
    """Mounts under ``workdir`` still present (for the final check)."""
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 1 and parts[1].startswith(str(workdir)):
                out.append(parts[1])
    return out


def loop_devices_backed_by(workdir: Path) -> list[str]:
    """Loop devices whose backing file is under ``workdir``."""
    p = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False)
    return [ln.split(":")[0] for ln in p.stdout.splitlines() if str(workdir) in ln]
