"""Memory-pressure signals from the kernel, fused into ``reclaim_memory`` reports.

* :mod:`~blkback.pressure.psi` and :mod:`~blkback.pressure.cgroups`: parsers and discovery
  (pure functions over file text, plus thin readers).
* :mod:`~blkback.pressure.sources`: one class per kernel signal (PSI triggers, PSI totals,
  cgroup v1 vmpressure, MemAvailable) and manual reports, all run by one poll thread.
* :mod:`~blkback.pressure.fusion`: the pure, clock-injected decision of what to deliver
  (signal fusion and storm coalescing).
* :mod:`~blkback.pressure.monitor`: :class:`PressureMonitor`, what the server runs.
* :mod:`~blkback.pressure.probe`: which sources work on this host, and why not.
"""

from __future__ import annotations
