"""Child process of the real-pressure tests: a core Bus with real pages and a PressureMonitor.

Protocol on stdout (one JSON object per line): ``{"ready": pid}``, then after ``go`` on stdin
(the parent moves us into the test cgroup in between) ``{"armed": ...}`` once the pools are
full and the monitor runs, then a status line every 100 ms until ``stop`` or EOF on stdin.
Times are CLOCK_MONOTONIC ns, comparable with the parent's ``time.monotonic_ns()``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading

from blkback.clock import MonotonicClock
from blkback.core.device import Bus
from blkback.core.pages import MmapAllocator
from blkback.core.params import Params
from blkback.core.policy import PressureLevel
from blkback.hostenv.procfs import process_memory
from blkback.pressure.monitor import PressureMonitor

PASS_NS = 100_000_000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rings", type=int, default=3)
    parser.add_argument("--pages", type=int, default=4096)
    parser.add_argument("--duration-ms", type=int, default=10)
    parser.add_argument("--policy", default="kernel")
    parser.add_argument("--mode", default="auto")
    args = parser.parse_args()

    def say(obj: dict[str, object]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ready": os.getpid()})
    if sys.stdin.readline().strip() != "go":
        return 1
    clock = MonotonicClock()
    params = Params(
        max_buffer_pages=args.pages,
        buffer_squeeze_duration_ms=args.duration_ms,
        squeeze_policy=args.policy,
    )
    bus = Bus(params)
    device = bus.add_device("d0")
    wake = threading.Event()
    allocators = []
    for _ in range(args.rings):
        alloc = MmapAllocator()
        allocators.append(alloc)
        ring = device.add_ring(alloc, clock.now_ns())
        pages = ring.get_pages(args.pages, clock.now_ns())
        for page in pages:
            alloc.view(page)[:] = b"\xa5" * 4096
        ring.put_pages(pages)
        ring.waker = wake.set
    lock = threading.Lock()
    deliveries: dict[str, int] = {}
    first_delivery: dict[str, int] = {}

    def deliver(level: PressureLevel, source: str) -> None:
        with lock:
            now = clock.now_ns()
            bus.reclaim_memory(now, level)
            deliveries[source] = deliveries.get(source, 0) + 1
            first_delivery.setdefault(source, now)

    monitor = PressureMonitor(deliver, mode=args.mode, clock=clock)
    monitor.start()

    stop = threading.Event()

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()
        wake.set()

    threading.Thread(target=watch_stdin, daemon=True).start()

    def state(kind: str) -> dict[str, object]:
        mem = process_memory()
        status = monitor.status()
        return {
            kind: True,
            "t_ns": clock.now_ns(),
            "pool_pages": bus.pool_pages(),
            "full_pages": args.rings * args.pages,
            "rss_anon": mem.get("RssAnon", 0),
            "vm_swap": mem.get("VmSwap", 0),
            "vm_rss": mem.get("VmRSS", 0),
            "deliveries": dict(deliveries),
            "first_delivery_ns": dict(first_delivery),
            "first_event_ns": dict(monitor.first_event_ns),
            "active": status["active"],
            "failed": status["failed"],
            "events": status["events"],
            "coalesced": status["coalesced"],
            "unconfirmed": status["unconfirmed"],
            "squeezed_pages": sum(r.stats.pages_squeezed for r in device.rings),
        }

    say(state("armed"))
    next_pass = clock.now_ns() + PASS_NS
    try:
        while not stop.is_set():
            timeout = max(0, next_pass - clock.now_ns()) / 1e9
            woke = wake.wait(timeout)
            wake.clear()
            now = clock.now_ns()
            with lock:
                for ring in device.rings:
                    if woke and ring.wake_pending:
                        ring.loop_pass(now, had_io=False, woken=True)
                    elif now >= next_pass:
                        ring.loop_pass(now, had_io=False)
            if now >= next_pass:
                next_pass = now + PASS_NS
                say(state("status"))
    finally:
        monitor.stop()
        say({"final": True, "monitor": monitor.status()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
