"""Host environment helpers for tests on real memory pressure and for ``blkback repro``.

Everything here changes the host (cgroups, swap, processes), so everything is a context
manager that undoes its change on the way out, whatever the way out is (an exception, a
failed assertion, Ctrl-C), and touches only what it created:

* :class:`~blkback.hostenv.cgroup.MemoryCgroup`: a cgroup v1 memory child with a limit.
* :class:`~blkback.hostenv.swap.TemporarySwap`: a swapfile, unless the host has swap.
* :class:`~blkback.hostenv.hog.MemoryHog`: a subprocess that keeps anonymous memory busy.
* :mod:`~blkback.hostenv.procfs`: ``/proc/vmstat`` swap counters and per-process memory.
"""

from __future__ import annotations

from blkback.hostenv.cgroup import MemoryCgroup
from blkback.hostenv.hog import MemoryHog
from blkback.hostenv.procfs import SwapCounters, process_memory, read_vmstat, swap_counters
from blkback.hostenv.swap import TemporarySwap, active_swaps

__all__ = [
    "MemoryCgroup",
    "MemoryHog",
    "SwapCounters",
    "TemporarySwap",
    "active_swaps",
    "process_memory",
    "read_vmstat",
    "swap_counters",
]
