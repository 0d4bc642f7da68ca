"""Real memory pressure squeezes real pools: a hog in a memory-limited cgroup with swap.

A child process (``pressure_pool_child.py``) holds a core Bus with 3 rings of real mmap
pages (48 MiB of pool), fills them, and runs a PressureMonitor in auto mode whose deliveries
go to ``bus.reclaim_memory``. The child and a hog share a cgroup v1 memory child with a
96 MiB limit and swap. Nobody reports pressure by hand: the monitor must see it.

What a squeeze frees leaves both RAM and swap (MADV_DONTNEED drops swap entries too), while
pages that are merely swapped out move from RssAnon to VmSwap. So the child's anonymous
footprint (RssAnon + VmSwap) is what must fall with the squeeze and stay without it.

Facilities: root, a cgroup v1 memory controller, swap (the host's, or a temporary
swapfile). When one is missing the test skips naming it, and fails instead under CI=true.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from blkback.hostenv.cgroup import MemoryCgroup
from blkback.hostenv.hog import MemoryHog

pytestmark = pytest.mark.root

CHILD = Path(__file__).with_name("pressure_pool_child.py")
MIB = 1 << 20
RINGS = 3
PAGES = 4096  # per ring: 16 MiB, 48 MiB in all
HOG_MIB = 160


class PoolChild:
    """The child process, its status lines on a queue, killed by PID at the end."""

    def __init__(self, cgroup: MemoryCgroup, *, duration_ms: int, policy: str = "kernel") -> None:
        argv = [
            sys.executable,
            str(CHILD),
            "--rings",
            str(RINGS),
            "--pages",
            str(PAGES),
            "--duration-ms",
            str(duration_ms),
            "--policy",
            policy,
        ]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.last: dict[str, Any] = {}
        assert self.proc.stdout is not None
        first = json.loads(self.proc.stdout.readline())
        cgroup.add_pid(first["ready"], started=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self._send("go")

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def wait_for(self, key: str, timeout: float) -> dict[str, Any]:
        """The next line carrying ``key`` (every line read updates ``last``)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"child sent no {key!r} line in {timeout} s; last {self.last}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.last = line
            if key in line:
                return line

    def until(self, predicate: Any, timeout: float) -> dict[str, Any]:
        """Status lines until ``predicate(line)``; the matching line, or the last one."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            self.last = line
            if "status" in line and predicate(line):
                return line
        if self.proc.poll() is not None:
            raise AssertionError(f"child exited ({self.proc.returncode}); last {self.last}")
        return self.last

    def close(self) -> dict[str, Any] | None:
        """Ask the child to stop; kill it (by PID) if it does not; return its final line."""
        final = None
        try:
            self._send("stop")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    line = self.lines.get(timeout=0.5)
                except queue.Empty:
                    continue
                if "final" in line:
                    final = line
                    break
        except (BrokenPipeError, OSError):
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.reader.join(5)
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        return final


def footprint(line: dict[str, Any]) -> int:
    """The child's anonymous memory, resident or swapped."""
    return int(line["rss_anon"]) + int(line["vm_swap"])


def test_pressure_squeezes_pools_and_rss(pressure_cgroup: MemoryCgroup) -> None:
    """Under a real hog the monitor detects pressure itself; pools go to 0; memory leaves."""
    child = PoolChild(pressure_cgroup, duration_ms=10)
    try:
        armed = child.wait_for("armed", timeout=30)
        pool_bytes = RINGS * PAGES * 4096
        assert armed["pool_pages"] == RINGS * PAGES
        assert footprint(armed) >= pool_bytes
        assert "manual" in armed["active"]
        assert len(armed["active"]) > 1, f"no kernel pressure source works: {armed['failed']}"
        with MemoryHog(HOG_MIB, cgroup=pressure_cgroup) as hog:
            assert hog.started_ns is not None
            line = child.until(
                lambda s: (
                    s["pool_pages"] == 0 and footprint(armed) - footprint(s) > pool_bytes // 2
                ),
                timeout=20,
            )
            latency = {src: (t - hog.started_ns) / 1e9 for src, t in line["first_event_ns"].items()}
            print(f"first events after hog start (s): {latency}; deliveries {line['deliveries']}")
        assert line["deliveries"], f"no delivery; failed sources: {line['failed']}"
        assert "manual" not in line["deliveries"]
        assert line["pool_pages"] == 0, f"pools not squeezed: {line}"
        assert line["squeezed_pages"] >= RINGS * PAGES
        dropped = footprint(armed) - footprint(line)
        assert dropped >= pool_bytes * 3 // 4, (
            f"anonymous footprint fell by {dropped // MIB} MiB only "
            f"(pool was {pool_bytes // MIB} MiB): {line}"
        )
    finally:
        final = child.close()
    if final is not None:
        print(json.dumps(final["monitor"]["events"]))


def test_no_squeeze_when_duration_is_zero(pressure_cgroup: MemoryCgroup) -> None:
    """buffer_squeeze_duration_ms=0: the monitor still sees pressure, the pools stay."""
    child = PoolChild(pressure_cgroup, duration_ms=0)
    try:
        armed = child.wait_for("armed", timeout=30)
        pool_bytes = RINGS * PAGES * 4096
        with MemoryHog(HOG_MIB, cgroup=pressure_cgroup):
            line = child.until(lambda s: sum(s["deliveries"].values()) >= 20, timeout=20)
            line = child.until(lambda s: False, timeout=2)  # keep the pressure on a while
        assert line["deliveries"], f"pressure not detected; failed sources: {line['failed']}"
        assert line["pool_pages"] == RINGS * PAGES
        assert line["squeezed_pages"] == 0
        assert footprint(line) >= pool_bytes * 9 // 10, f"pool memory went away: {line}"
        assert footprint(armed) - footprint(line) < pool_bytes // 10
    finally:
        child.close()
