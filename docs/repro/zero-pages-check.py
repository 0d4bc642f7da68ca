"""Zero-filled pages swap out without I/O and outside pswpout (Linux >= 6.12).

Run as root from a checkout (``.venv/bin/python docs/repro/zero-pages-check.py``): a child
in a 64 MiB cgroup v1 memory child maps 200 MiB, fills it with zeroes (then, in a second
child, with random bytes), reads it back, twice; a temporary swapfile is used. Prints the
/proc/vmstat deltas of pswpout, swpout_zero, pswpin and swpin_zero for each.
"""

import os
import subprocess
import sys

from blkback.hostenv.cgroup import MemoryCgroup
from blkback.hostenv.procfs import read_vmstat
from blkback.hostenv.swap import TemporarySwap

COUNTERS = ("pswpout", "swpout_zero", "pswpin", "swpin_zero")
CHILD = r"""
import mmap, os, sys
n = 200 << 20
fill = os.urandom(1 << 20) if sys.argv[1] == "random" else bytes(1 << 20)
for _ in range(2):
    m = mmap.mmap(-1, n)
    for off in range(0, n, 1 << 20):
        m[off : off + (1 << 20)] = fill
    total = sum(m[off] for off in range(0, n, 1 << 20))
    m.close()
"""

with TemporarySwap(600, reuse_host=False, priority=1000):
    for data in ("zero", "random"):
        with MemoryCgroup(f"zero-pages-{os.getpid()}-{data}", limit_bytes=64 << 20) as cg:
            join = f"open({cg.path + '/cgroup.procs'!r}, 'w').write(str(os.getpid()))"
            before = read_vmstat()
            child = subprocess.Popen(
                [sys.executable, "-c", f"import os; {join}\n{CHILD}", data]
            )
            cg.started.add(child.pid)
            child.wait()
            after = read_vmstat()
            print(data, {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS})
