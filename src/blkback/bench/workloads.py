"""The fio cells: one access pattern, block size and queue depth each.

Every server runs the same job. The names are stable keys of the JSON output.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


@dataclass(frozen=True, slots=True)
class Workload:
    """One fio job: ``--rw``, ``--bs`` and ``--iodepth``."""

    name: str
    rw: str
    bs_bytes: int
    iodepth: int

    @property
    def direction(self) -> str:
        """``"read"`` or ``"write"``: the section of fio's JSON that holds the numbers."""
        return "read" if self.rw.endswith("read") else "write"

    @property
    def sequential(self) -> bool:
        """True for sequential patterns (``read``/``write``)."""
        return not self.rw.startswith("rand")


def _w(rw: str, bs_bytes: int, iodepth: int) -> Workload:
    bs = f"{bs_bytes // MIB}M" if bs_bytes >= MIB else f"{bs_bytes // KIB}k"
    return Workload(f"{rw}-{bs}-q{iodepth}", rw, bs_bytes, iodepth)


#: Every cell, in the order they run inside one repeat (writes of a kind before reads).
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        _w("write", MIB, 1),
        _w("write", MIB, 16),
        _w("read", MIB, 1),
        _w("read", MIB, 16),
        _w("randwrite", 4 * KIB, 1),
        _w("randwrite", 4 * KIB, 16),
        _w("randread", 4 * KIB, 1),
        _w("randread", 4 * KIB, 16),
    )
}

#: Where the pool variants (max_buffer_pages=0, permanent squeeze) are measured.
PRICE_WORKLOADS: tuple[str, ...] = (
    "write-1M-q16",
    "read-1M-q16",
    "randwrite-4k-q16",
    "randread-4k-q16",
)

#: ``--quick``: the QD16 cells only.
QUICK_WORKLOADS: tuple[str, ...] = PRICE_WORKLOADS
