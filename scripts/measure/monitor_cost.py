"""The pressure monitor's own CPU on this host: a monitor with a no-op delivery, T seconds.

Usage: .venv/bin/python scripts/measure/monitor_cost.py [T [MODE]]   (T=10, MODE=auto)
Prints the process's CPU over T seconds (only the monitor's thread runs) and how many
PSI-totals samples it took: the cost of one wake-up of the poll thread, all in.
"""

from __future__ import annotations

import resource
import sys
import time

from blkback.pressure.monitor import PressureMonitor

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
monitor = PressureMonitor(
    lambda level, source: None, mode=sys.argv[2] if len(sys.argv) > 2 else "auto"
)
monitor.start()
try:
    before = resource.getrusage(resource.RUSAGE_SELF)
    samples_before = dict(monitor.samples)
    t0 = time.monotonic()
    time.sleep(seconds)
    t1 = time.monotonic()
    after = resource.getrusage(resource.RUSAGE_SELF)
    samples = {k: v - samples_before.get(k, 0) for k, v in monitor.samples.items()}
    sources = monitor.active_sources()
finally:
    monitor.stop()
cpu_s = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
print(
    f"sources {', '.join(sources)}: {1000 * cpu_s:.1f} ms of CPU in "
    f"{t1 - t0:.1f} s = {100 * cpu_s / (t1 - t0):.3f} % of a core; samples without level {samples}"
)
