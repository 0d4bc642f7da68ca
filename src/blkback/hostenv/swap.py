"""A temporary swapfile (fallocate, chmod 600, mkswap, swapon; swapoff and rm on exit)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile

from blkback.clock import NS_PER_S, MonotonicClock
from blkback.errors import EnvironmentProblem


def active_swaps(path: str = "/proc/swaps") -> list[dict[str, str]]:
    """The entries of ``/proc/swaps`` (filename, type, size, used, priority)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out: list[dict[str, str]] = []
    for line in lines[1:]:
        parts = line.split()
        if len(parts) >= 5:
            out.append(
                {
                    "filename": parts[0],
                    "type": parts[1],
                    "size_kib": parts[2],
                    "used_kib": parts[3],
                    "priority": parts[4],
                }
            )
    return out


def _run(argv: list[str]) -> None:
    tool = shutil.which(argv[0])
    if tool is None:
        raise EnvironmentProblem(f"{argv[0]} not found (util-linux)")
    proc = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        why = proc.stderr.strip() or proc.stdout.strip()
        raise EnvironmentProblem(f"{' '.join(argv)} failed ({proc.returncode}): {why}")


class TemporarySwap:
    """Swap for the duration of a ``with`` block.

    If the host already has active swap and ``reuse_host`` is set, nothing is created
    (``created`` stays False) and the host's swap is used. Otherwise a swapfile of
    ``size_mib`` is made in ``directory`` and activated; it is deactivated and deleted on
    exit, also after an exception or Ctrl-C.
    """

    def __init__(
        self, size_mib: int = 512, directory: str = "/var/tmp", *, reuse_host: bool = True
    ) -> None:
        self.size_mib = size_mib
        self.directory = directory
        self.reuse_host = reuse_host
        self.path: str | None = None
        self.created = False
        self.active = False

    def __enter__(self) -> TemporarySwap:
        if self.reuse_host and active_swaps():
            return self
        if os.geteuid() != 0:
            raise EnvironmentProblem("swapon needs root")
        fd, path = tempfile.mkstemp(prefix="blkback-swap-", dir=self.directory)
        os.close(fd)
        self.path = path
        self.created = True
        try:
            os.chmod(path, 0o600)
            _run(["fallocate", "-l", f"{self.size_mib}M", path])
            _run(["mkswap", "-q", path])
            _run(["swapon", path])
            self.active = True
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self.path is None:
            return
        if self.active:
            # swapoff must read every swapped page back in; when an owner sits at its
            # cgroup's limit that can fail with ENOMEM for a moment: retry before giving up.
            clock = MonotonicClock()
            for attempt in range(5):
                try:
                    _run(["swapoff", self.path])
                    break
                except EnvironmentProblem:
                    if attempt == 4:
                        raise
                    clock.wait_until(clock.now_ns() + (1 + attempt) * NS_PER_S)
            self.active = False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.path = None
