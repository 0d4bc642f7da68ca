"""CPU time of a MiB copied between a page buffer and a cold 1 GiB export: slices or ctypes.

Why ``MemoryRegion`` releases the GIL only for large writes (``GIL_FREE_COPY``): the copy
through ``ctypes.memmove`` (the GIL released) against the slice assignment the region uses
otherwise (the GIL held), both in ``COPY_PIECE`` pieces, into (write) and out of (read) a
populated export. Usage: .venv/bin/python scripts/measure/copy_gil.py (about 1 GiB of RAM).
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Callable

from blkback.storage import region

GIB = 1 << 30
MIB = 1 << 20
PIECE = region.COPY_PIECE
FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
export = mmap.mmap(-1, GIB, flags=FLAGS)
mem = memoryview(export)
page = memoryview(mmap.mmap(-1, MIB, flags=FLAGS))
page[:] = b"y" * MIB
for off in range(0, GIB, MIB):  # populated, as a prefilled export is
    export[off : off + MIB] = page


def read_slices() -> None:
    for off in range(0, GIB, MIB):
        for i in range(0, MIB, PIECE):
            page[i : i + PIECE] = mem[off + i : off + i + PIECE]


def read_ctypes() -> None:
    for off in range(0, GIB, MIB):
        region._move(region._address(page), region._address(mem[off : off + MIB]), MIB)


def write_slices() -> None:
    for off in range(0, GIB, MIB):
        for i in range(0, MIB, PIECE):
            export[off + i : off + i + PIECE] = page[i : i + PIECE]


def write_ctypes() -> None:
    for off in range(0, GIB, MIB):
        region._move(region._address(export, off), region._address(page), MIB)


def us_per_mib(copy: Callable[[], None]) -> float:
    start = time.thread_time_ns()
    copy()
    return (time.thread_time_ns() - start) / (GIB // MIB) / 1000


for _ in range(3):
    print(
        "  ".join(
            f"{f.__name__} {us_per_mib(f):5.1f}"
            for f in (read_slices, read_ctypes, write_slices, write_ctypes)
        ),
        "us/MiB",
    )
