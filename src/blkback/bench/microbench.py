"""Measure the page pool's hot operations on real pages: get/put cycles, allocation, shrink.

Prints operations per second and ns per page for: a warm pool (get+put, no allocation), a cold
pool (every get allocates a fresh mmap page and every shrink frees it, the seed's worst case
of ``max_buffer_pages=0``), and shrinking a full pool in batches of 10.
"""

from __future__ import annotations

import argparse
import json
import time

from blkback.core.pages import PAGE_SIZE, MmapAllocator
from blkback.core.pool import PagePool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument("--pages", type=int, default=16, help="pages per request (default 16)")
    parser.add_argument("--rounds", type=int, default=20000, help="requests per case")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _touch(alloc: MmapAllocator, pages: list[int]) -> None:
    for p in pages:
        alloc.view(p)[0] = 1


def run(args: argparse.Namespace) -> int:
    """Run the three cases and print their rates."""
    n, rounds = args.pages, args.rounds
    results: dict[str, dict[str, float]] = {}

    alloc = MmapAllocator()
    pool = PagePool(alloc)
    pool.put(pool.get_many(n))
    t0 = time.perf_counter_ns()
    for _ in range(rounds):
        pool.put(pool.get_many(n))
    dt = time.perf_counter_ns() - t0
    results["warm_get_put"] = {
        "ns_per_page": dt / (rounds * n),
        "requests_per_s": rounds / dt * 1e9,
    }

    alloc = MmapAllocator()
    pool = PagePool(alloc)
    t0 = time.perf_counter_ns()
    for _ in range(rounds):
        pages = pool.get_many(n)
        _touch(alloc, pages)  # a new page costs its first-touch fault
        pool.put(pages)
        pool.shrink(0, 10)
    dt = time.perf_counter_ns() - t0
    results["cold_get_touch_put_shrink0"] = {
        "ns_per_page": dt / (rounds * n),
        "requests_per_s": rounds / dt * 1e9,
    }

    alloc = MmapAllocator()
    pool = PagePool(alloc)
    total = 25600  # 100 MiB
    pages = pool.get_many(total)
    _touch(alloc, pages)
    pool.put(pages)
    t0 = time.perf_counter_ns()
    freed = pool.shrink(0, 10)
    dt = time.perf_counter_ns() - t0
    results["shrink_100MiB_batch10"] = {
        "ns_per_page": dt / freed,
        "mib_per_s": freed * PAGE_SIZE / 2**20 / (dt / 1e9),
    }

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, r in results.items():
            print(f"{name:28s} " + "  ".join(f"{k}={v:,.1f}" for k, v in r.items()))
    return 0
