"""The memory hog's child process (see :mod:`blkback.hostenv.hog`); imports nothing of blkback."""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time

MIB = 1 << 20
PAGE = 4096


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="anonymous-memory hog")
    parser.add_argument("--mib", type=int, required=True)
    parser.add_argument("--ramp-mib-per-s", type=float, default=None)
    parser.add_argument("--wait-go", action="store_true")
    args = parser.parse_args(argv)
    print(f"ready {os.getpid()}", flush=True)
    if args.wait_go and sys.stdin.readline().strip() != "go":
        return 1
    size = args.mib * MIB
    mem = mmap.mmap(
        -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE
    )
    mapped = size if args.ramp_mib_per_s is None else 0
    start = time.monotonic()
    tick = 0
    while True:
        tick = (tick + 1) & 0xFF
        if mapped < size:
            want = int((time.monotonic() - start) * args.ramp_mib_per_s * MIB)
            mapped = min(size, max(mapped + PAGE, want - want % PAGE))
            print(f"mapped {mapped // MIB}", flush=True)
        for off in range(0, mapped, PAGE):
            mem[off] = tick
        if mapped < size:
            time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
