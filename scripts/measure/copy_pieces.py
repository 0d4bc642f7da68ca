"""CPU time of copying 1 MiB into a cold 1 GiB anonymous mapping, whole or in pieces.

Why MemoryRegion copies in 256 KiB pieces: glibc's memcpy uses ``rep movsb`` below its
``rep_movsb_stop_threshold`` (the L2 size; ``ld.so --list-diagnostics`` shows it) and a vector
loop from there on. Usage: .venv/bin/python scripts/measure/copy_pieces.py (about 1 GiB of RAM).
"""

from __future__ import annotations

import mmap
import time

GIB = 1 << 30
MIB = 1 << 20
FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
dst = memoryview(mmap.mmap(-1, GIB, flags=FLAGS))
src = memoryview(mmap.mmap(-1, MIB, flags=FLAGS))
src[:] = b"x" * MIB
for off in range(0, GIB, MIB):  # populated, as a prefilled export is
    dst[off : off + MIB] = src


def us_per_mib(piece: int) -> float:
    start = time.thread_time_ns()
    for _ in range(2):
        for off in range(0, GIB, MIB):
            for i in range(0, MIB, piece):
                dst[off + i : off + i + piece] = src[i : i + piece]
    return (time.thread_time_ns() - start) / (2 * GIB // MIB) / 1000


for _ in range(3):
    print(
        "  ".join(
            f"{p >> 10}K pieces {us_per_mib(p):5.1f} us/MiB"
            for p in (MIB, 256 << 10, 64 << 10, 32 << 10)
        )
    )
