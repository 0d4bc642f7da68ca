"""Shared helpers for the storage tests (a plain module: no conftest name clashes)."""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

PAGE = 4096


def page_buffers(n_bytes: int) -> tuple[mmap.mmap, list[memoryview]]:
    """Private anonymous mmap memory cut into 4 KiB memoryviews, like the server's pool."""
    m = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mv = memoryview(m)
    return m, [mv[i : i + PAGE] for i in range(0, n_bytes, PAGE)]


def fill(bufs: list[memoryview], data: bytes) -> None:
    pos = 0
    for b in bufs:
        b[:] = data[pos : pos + len(b)]
        pos += len(b)


def joined(bufs: list[memoryview]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def supports_direct(directory: str) -> bool:
    """True if files in ``directory`` can be opened with O_DIRECT."""
    fd, path = tempfile.mkstemp(dir=directory)
    os.close(fd)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
    except OSError:
        return False
    else:
        return True
    finally:
        os.unlink(path)


@contextmanager
def shm_dir() -> Iterator[str]:
    """A temporary directory on tmpfs (/dev/shm), where O_DIRECT is refused."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        yield d


def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512
