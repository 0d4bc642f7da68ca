"""Usage: .venv/bin/python scripts/measure/pool_cycle.py

Pool cycle cost per page: get n pages, touch each, put back, then (keep | trim lazily | trim at once)."""
import time
from blkback.core.pages import MmapAllocator, Release
from blkback.core.pool import PagePool
def run(n, mode, rounds):
    a = MmapAllocator(); p = PagePool(a)
    pg = p.get_many(n); [a.view(x).__setitem__(0, 1) for x in pg]; p.put(pg)
    c = time.process_time()
    for _ in range(rounds):
        pg = p.get_many(n)
        for x in pg: a.view(x)[0] = 1
        p.put(pg)
        if mode != "keep": p.shrink(0, 10, Release.LAZY if mode == "lazy" else Release.NOW)
    return (time.process_time() - c) / rounds / n * 1e6
for n in (1, 8, 16, 256):
    r = 40000 if n < 256 else 4000
    print(f"{n:4d} pages/cycle: keep {run(n, 'keep', r):.3f}  MADV_FREE {run(n, 'lazy', r):.3f}  MADV_DONTNEED {run(n, 'now', r // 4):.3f}  us/page")
