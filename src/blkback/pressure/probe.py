"""Which pressure sources work on this host, and why (or why not): the startup self-check.

Every source is actually opened and closed again (a PSI trigger is armed, vmpressure
eventfds are registered), so the answer is what the kernel says, not a guess from file
names; the details add the context that explains a refusal: CAP_SYS_RESOURCE (CapEff bit
24), the 2 s trigger-window rule, the cgroup layout (v1, v2 or hybrid).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from blkback.errors import EnvironmentProblem
from blkback.pressure.cgroups import CgroupLayout, has_cap_sys_resource, read_layout
from blkback.pressure.monitor import SOURCE_NAMES, build_sources
from blkback.pressure.sources import GLOBAL_PSI_MEMORY, SourceEvent


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """One source's verdict."""

    name: str
    works: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        """JSON-able form."""
        return asdict(self)


def _ignore(_event: SourceEvent) -> None:
    return None


def layout_summary(layout: CgroupLayout) -> str:
    """One line describing the cgroup layout and this process's place in it."""
    mem = layout.v1_dir("memory")
    v2 = layout.v2_dir()
    return (
        f"cgroup layout {layout.kind}; v1 memory cgroup: {mem or 'none'}; v2 cgroup: {v2 or 'none'}"
    )


def probe(layout: CgroupLayout | None = None) -> list[SourceStatus]:
    """Try every source once; return a status for each, in :data:`SOURCE_NAMES` order."""
    layout = layout or read_layout()
    cap = has_cap_sys_resource()
    cap_text = (
        "CAP_SYS_RESOURCE present (CapEff bit 24): short trigger windows allowed"
        if cap
        else "no CAP_SYS_RESOURCE (CapEff bit 24 clear): trigger windows must be multiples "
        "of 2 s and writes NUL-terminated"
    )
    out: list[SourceStatus] = []
    for name in SOURCE_NAMES:
        if name == "manual":
            out.append(SourceStatus(name, True, "API reports (ctl pressure); always available"))
            continue
        sources, failed = build_sources(
            (name,), layout, psi_period_ns=50_000_000, meminfo_period_ns=250_000_000
        )
        if name in failed:
            out.append(SourceStatus(name, False, failed[name] + f" ({layout_summary(layout)})"))
            continue
        source = sources[0]
        try:
            source.open(0, _ignore)
        except EnvironmentProblem as exc:
            detail = str(exc)
            if name.startswith("psi-trigger"):
                detail += f"; {cap_text}"
            if name == "vmpressure":
                detail += f" ({layout_summary(layout)})"
            out.append(SourceStatus(name, False, detail))
            continue
        try:
            detail = source.detail
            if name.startswith("psi-trigger"):
                detail += f"; {cap_text}"
            if name == "vmpressure" or name.endswith("-cgroup"):
                detail += f" ({layout_summary(layout)})"
            if name == "psi-total" and not os.path.exists(GLOBAL_PSI_MEMORY):
                detail += " (no PSI)"
            out.append(SourceStatus(name, True, detail))
        finally:
            source.close()
    return out
