"""A cgroup v1 memory child with a limit, removed again on exit."""

from __future__ import annotations

import contextlib
import errno
import os
import signal

from blkback.clock import NS_PER_MS, NS_PER_S, MonotonicClock
from blkback.errors import EnvironmentProblem
from blkback.pressure.cgroups import read_layout
from blkback.pressure.sources import parse_memory_stat


def v1_memory_root() -> str:
    """The mount point of the cgroup v1 memory controller, or EnvironmentProblem."""
    root = read_layout().v1_root("memory")
    if root is None:
        raise EnvironmentProblem("no cgroup v1 memory controller is mounted")
    return root


class MemoryCgroup:
    """``<v1 memory root>/<name>`` with ``memory.limit_in_bytes`` set.

    Args:
        name: directory name (may contain ``/`` for nesting under existing cgroups).
        limit_bytes: the memory limit.
        memsw_limit_bytes: memory+swap limit when the kernel has ``memory.memsw.*``
            (None: leave unlimited, so the group may swap freely).
        swappiness: ``memory.swappiness`` (None: inherit).
        root: the v1 memory mount (found from mountinfo when None).

    Removal (on exit) waits for the cgroup to be empty: processes this object started
    (registered with ``add_pid(pid, started=True)``) are killed; any other process is
    moved out to the parent cgroup, never killed.
    """

    def __init__(
        self,
        name: str,
        *,
        limit_bytes: int,
        memsw_limit_bytes: int | None = None,
        swappiness: int | None = None,
        root: str | None = None,
    ) -> None:
        self.name = name
        self.limit_bytes = limit_bytes
        self.memsw_limit_bytes = memsw_limit_bytes
        self.swappiness = swappiness
        self._root = root
        self.path = ""
        self.started: set[int] = set()
        self.created = False

    # -- files ----------------------------------------------------------------------------
    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write(self, name: str, value: str | int) -> None:
        """Write a control file of this cgroup."""
        with open(self._file(name), "w") as f:
            f.write(str(value))

    def read(self, name: str) -> str:
        """Read a control file of this cgroup."""
        with open(self._file(name)) as f:
            return f.read()

    def has(self, name: str) -> bool:
        """Whether this cgroup has control file ``name``."""
        return os.path.exists(self._file(name))

    # -- life cycle -----------------------------------------------------------------------
    def create(self) -> MemoryCgroup:
        """Make the directory and set the limits (undone by :meth:`remove`)."""
        root = self._root or v1_memory_root()
        self.path = os.path.join(root, self.name)
        try:
            os.mkdir(self.path)
        except FileExistsError:
            raise EnvironmentProblem(f"cgroup {self.path} exists already") from None
        except PermissionError:
            raise EnvironmentProblem(
                f"cannot create cgroup {self.path}: not permitted (root?)"
            ) from None
        except OSError as exc:
            raise EnvironmentProblem(f"cannot create cgroup {self.path}: {exc.strerror}") from None
        self.created = True
        try:
            self.write("memory.limit_in_bytes", self.limit_bytes)
            if self.memsw_limit_bytes is not None and self.has("memory.memsw.limit_in_bytes"):
                self.write("memory.memsw.limit_in_bytes", self.memsw_limit_bytes)
            if self.swappiness is not None:
                self.write("memory.swappiness", self.swappiness)
        except BaseException:
            self.remove()
            raise
        return self

    def __enter__(self) -> MemoryCgroup:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def add_pid(self, pid: int, *, started: bool = False) -> None:
        """Move process ``pid`` in; ``started``: ours to kill when the cgroup goes."""
        if started:
            self.started.add(pid)
        self.write("cgroup.procs", pid)

    def pids(self) -> list[int]:
        """Processes in the cgroup now."""
        try:
            text = self.read("cgroup.procs")
        except FileNotFoundError:
            return []
        return [int(x) for x in text.split()]

    def remove(self, timeout: float = 10.0) -> None:
        """Empty the cgroup (kill our processes, move others out) and delete it."""
        if not self.created:
            return
        parent = os.path.dirname(self.path)
        clock = MonotonicClock()
        deadline = clock.now_ns() + round(timeout * NS_PER_S)
        while True:
            for pid in self.pids():
                if pid in self.started:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                else:
                    with (
                        contextlib.suppress(OSError),
                        open(os.path.join(parent, "cgroup.procs"), "w") as f,
                    ):
                        f.write(str(pid))
            try:
                os.rmdir(self.path)
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or clock.now_ns() > deadline:
                    raise EnvironmentProblem(
                        f"cannot remove cgroup {self.path}: {exc.strerror}; "
                        f"processes left: {self.pids()}"
                    ) from None
                clock.wait_until(clock.now_ns() + 50 * NS_PER_MS)
                continue
            break
        self.created = False

    # -- facts ----------------------------------------------------------------------------
    def stat(self) -> dict[str, int]:
        """``memory.stat`` as integers."""
        return parse_memory_stat(self.read("memory.stat"))

    def usage_bytes(self) -> int:
        """``memory.usage_in_bytes``."""
        return int(self.read("memory.usage_in_bytes"))
