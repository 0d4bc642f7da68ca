"""An anonymous-memory hog: a subprocess that maps private memory and keeps touching it.

The child (:mod:`blkback.hostenv.hogchild`) runs as
``python -m blkback.hostenv.hogchild --mib N [--ramp-mib-per-s R] [--wait-go]``: it prints
``ready <pid>``, waits for ``go`` on stdin when asked (so that the parent can move it into a
cgroup first), then maps ``N`` MiB of ``MAP_PRIVATE | MAP_ANONYMOUS`` memory (all at once, or
``R`` MiB/s), printing ``mapped <mib>`` as it grows, and writes one byte of every page, over
and over, until killed. Under a cgroup limit below ``N`` reclaim and swap never stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

from blkback.clock import MonotonicClock
from blkback.errors import EnvironmentProblem

if TYPE_CHECKING:
    from blkback.hostenv.cgroup import MemoryCgroup

MIB = 1 << 20
PAGE = 4096


class MemoryHog:
    """Context manager running the hog child (killed by PID on exit).

    Args:
        mib: how much anonymous memory to map and keep touching.
        ramp_mib_per_s: grow at this rate instead of all at once.
        cgroup: move the child into this cgroup before it touches memory.
    """

    def __init__(
        self,
        mib: int,
        *,
        ramp_mib_per_s: float | None = None,
        cgroup: MemoryCgroup | None = None,
        python: str = sys.executable,
    ) -> None:
        self.mib = mib
        self.ramp = ramp_mib_per_s
        self.cgroup = cgroup
        self.python = python
        self.proc: subprocess.Popen[str] | None = None
        self.started_ns: int | None = None

    @property
    def pid(self) -> int:
        """The child's PID."""
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> MemoryHog:
        argv = [self.python, "-m", "blkback.hostenv.hogchild", "--mib", str(self.mib), "--wait-go"]
        if self.ramp is not None:
            argv += ["--ramp-mib-per-s", str(self.ramp)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        try:
            assert self.proc.stdout is not None
            assert self.proc.stdin is not None
            line = self.proc.stdout.readline()
            if not line.startswith("ready"):
                raise EnvironmentProblem(f"memory hog did not start: {line!r}")
            if self.cgroup is not None:
                self.cgroup.add_pid(self.proc.pid, started=True)
            self.started_ns = MonotonicClock().now_ns()
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> bool:
        """Whether the child still runs (the OOM killer may have taken it)."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Kill the child (by its PID) and reap it."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.proc = None
