"""Where this process's cgroups are: parsing ``/proc/self/cgroup`` and ``mountinfo``.

Hosts come in three layouts: pure v1 (one mount per controller), pure v2 (one ``cgroup2``
mount) and hybrid (v1 controllers plus a ``cgroup2`` mount, often ``/sys/fs/cgroup/unified``,
that has no controller but carries the PSI files). This machine is hybrid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CgroupMount:
    """One cgroup filesystem mount."""

    mount_point: str
    version: int  # 1 or 2
    root: str  # the cgroup path mounted there ("/" normally)
    controllers: frozenset[str]  # v1 options naming controllers (empty for v2)


@dataclass(frozen=True, slots=True)
class CgroupLayout:
    """The mounts and this process's membership."""

    mounts: tuple[CgroupMount, ...]
    v1_paths: dict[str, str]  # controller -> cgroup path ("memory" -> "/a/b")
    v2_path: str | None  # the "0::" line's path, if any

    @property
    def kind(self) -> str:
        """``"v1"``, ``"v2"``, ``"hybrid"`` or ``"none"``."""
        has1 = any(m.version == 1 for m in self.mounts)
        has2 = any(m.version == 2 for m in self.mounts)
        if has1 and has2:
            return "hybrid"
        if has1:
            return "v1"
        return "v2" if has2 else "none"

    def v1_dir(self, controller: str) -> str | None:
        """This process's directory in the v1 hierarchy of ``controller``, if mounted."""
        path = self.v1_paths.get(controller)
        if path is None:
            return None
        for mount in self.mounts:
            if mount.version == 1 and controller in mount.controllers:
                return _join(mount, path)
        return None

    def v1_root(self, controller: str) -> str | None:
        """The mount point of the v1 hierarchy of ``controller``."""
        for mount in self.mounts:
            if mount.version == 1 and controller in mount.controllers:
                return mount.mount_point
        return None

    def v2_dir(self) -> str | None:
        """This process's directory in the v2 hierarchy, if mounted."""
        if self.v2_path is None:
            return None
        for mount in self.mounts:
            if mount.version == 2:
                return _join(mount, self.v2_path)
        return None


def _join(mount: CgroupMount, path: str) -> str | None:
    root = mount.root.rstrip("/")
    if root and not (path == root or path.startswith(root + "/")):
        return None  # our cgroup is outside what this mount shows (a namespace)
    rel = path[len(root) :].lstrip("/")
    return os.path.join(mount.mount_point, rel) if rel else mount.mount_point


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo octal.
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> tuple[CgroupMount, ...]:
    """The cgroup mounts listed in a ``/proc/<pid>/mountinfo`` text."""
    mounts: list[CgroupMount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf = left.split()
        rf = right.split()
        if len(lf) < 5 or len(rf) < 3:
            continue
        fstype = rf[0]
        if fstype == "cgroup2":
            mounts.append(CgroupMount(_unescape(lf[4]), 2, _unescape(lf[3]), frozenset()))
        elif fstype == "cgroup":
            opts = frozenset(rf[2].split(","))
            mounts.append(CgroupMount(_unescape(lf[4]), 1, _unescape(lf[3]), opts))
    return tuple(mounts)


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """``/proc/<pid>/cgroup`` to (v1 controller -> path, v2 path or None)."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        if hier == "0" and controllers == "":
            v2 = path
            continue
        for controller in controllers.split(","):
            if controller:
                v1[controller] = path
    return v1, v2


def read_layout(pid: int | str = "self") -> CgroupLayout:
    """The cgroup layout as seen by process ``pid`` (``"self"`` by default)."""
    with open(f"/proc/{pid}/mountinfo") as f:
        mounts = parse_mountinfo(f.read())
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            v1, v2 = parse_proc_cgroup(f.read())
    except FileNotFoundError:
        v1, v2 = {}, None
    return CgroupLayout(mounts, v1, v2)


def cap_effective(status_text: str) -> int:
    """The ``CapEff`` bit mask from a ``/proc/<pid>/status`` text (0 if absent)."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


CAP_SYS_RESOURCE = 24


def has_cap_sys_resource() -> bool:
    """Whether this process has CAP_SYS_RESOURCE in its effective set (PSI short windows)."""
    try:
        with open("/proc/self/status") as f:
            return bool(cap_effective(f.read()) >> CAP_SYS_RESOURCE & 1)
    except OSError:
        return False
