"""An export's bytes in this process's own memory, and which of its pages may hold data.

:class:`MemoryRegion` is the memory backend's data and its page map in one object, so that
the copy and the marking that must follow it are written once: the backend's own
``preadv``/``pwritev`` use it after their checks, and the server's fast path calls it
directly (it is the backend's :meth:`~blkback.storage.base.Storage.direct_access`), with no
call into the storage object. It is compiled with the data path (``blkback._native``): a
4 KiB write then costs no Python frame for its marking.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Final

from librt.vecs import extend, vec
from mypy_extensions import i64, u8

from blkback.storage.direct import DirectIO

#: The page map's granularity: a byte of ``used`` per 4 KiB of the export (NBD's block
#: status unit here). Storage's own unit, not the pool's page (``core.pages.PAGE_SIZE``),
#: which storage does not import (docs/design.md, package map).
MAP_SHIFT: Final = 12
MAP_PAGE_SIZE: Final = 1 << MAP_SHIFT
#: Copies go in pieces of at most this many bytes. glibc's ``memcpy`` uses ``rep movsb``
#: below its ``rep_movsb_stop_threshold`` (the L2 size: 1 MiB on this machine's EPYC) and a
#: vector loop from there on, which copied a MiB into a cold storage page 10 % slower here
#: (42.7 against 38.4 µs per MiB in 256 KiB pieces; docs/data-path.md section 5).
COPY_PIECE: Final = 256 * 1024


#: A write of at least this many bytes is copied with the GIL released (:func:`_move`), so
#: that the ring receives the next request while its store worker copies this one (the
#: server's ``ASYNC_WRITE``; docs/data-path.md §8). Only there: a ``ctypes`` copy of a MiB
#: costs ~2 us more than a slice assignment with a warm cache, 3-13 us with a cold export
#: (``scripts/measure/copy_gil.py``), which a read, copied on the ring, would pay for nothing.
GIL_FREE_COPY: Final = 256 * 1024

#: The page map is built, and scanned for runs (:meth:`MemoryRegion.run_at`), this many
#: entries at a time: a bounded temporary ``bytes``, whatever the export's size.
MAP_CHUNK: Final = 64 * 1024

#: libc's ``memmove`` through ``ctypes``: a foreign call releases the GIL while it runs.
_memmove: Final = ctypes.memmove


def _address(buf: mmap.mmap | bytearray | memoryview, offset: int = 0) -> int:
    """The address of ``buf[offset]`` (a writable buffer).

    Nothing holds the buffer once this returns: callers take addresses only in memory that
    outlives the copy (the export's mapping, closed after the last request; a request's
    pages, which stay mapped while in flight).
    """
    return ctypes.addressof(ctypes.c_char.from_buffer(buf, offset))


def _copy(dst: memoryview, src: memoryview) -> None:
    """``dst[:] = src`` (same lengths), in pieces of at most :data:`COPY_PIECE` bytes."""
    n = len(dst)
    if n <= COPY_PIECE:
        dst[:] = src
        return
    for i in range(0, n, COPY_PIECE):
        dst[i : i + COPY_PIECE] = src[i : i + COPY_PIECE]


def _store(memory: mmap.mmap | bytearray, pos: int, src: memoryview) -> None:
    """``memory[pos : pos + len(src)] = src``, in pieces of at most :data:`COPY_PIECE` bytes;
    a large copy from a writable ``src`` releases the GIL.

    The slice is assigned on the mapping (or bytearray) itself: a memoryview slice of it
    as the target would be one more object per copy (~570 instructions compiled).
    """
    n = len(src)
    if n >= GIL_FREE_COPY and not src.readonly:
        _move(_address(memory, pos), _address(src), n)
    elif n <= COPY_PIECE:
        memory[pos : pos + n] = src
    else:
        for i in range(0, n, COPY_PIECE):
            end = min(i + COPY_PIECE, n)  # exact: a bytearray would grow to fit a longer slice
            memory[pos + i : pos + end] = src[i:end]


def _move(dst: int, src: int, n: int) -> None:
    """Copy ``n`` bytes from address ``src`` to ``dst`` in :data:`COPY_PIECE` pieces, each a
    ``memmove`` with the GIL released."""
    for i in range(0, n, COPY_PIECE):
        _memmove(dst + i, src + i, min(COPY_PIECE, n - i))


def _zero_map(n: int) -> vec[u8]:
    """A page map of ``n`` zero entries, built :data:`MAP_CHUNK` at a time."""
    used = vec[u8](capacity=n)
    chunk = bytes(MAP_CHUNK)
    while len(used) + MAP_CHUNK <= n:
        used = extend(used, chunk)
    return extend(used, bytes(n - len(used)))


class MemoryRegion(DirectIO):
    """``memory`` (a whole export) and a byte per 4 KiB page: 1 when the page may hold data.

    Callers check ranges first: the region copies and marks, nothing else. ``mem`` is a
    memoryview of ``memory``: reads copy from its slices.

    The page map ``used`` is a ``librt.vecs`` ``vec[u8]``, not a ``bytearray``: compiled, a
    ``vec`` item is set natively, where a ``bytearray`` item is set through
    ``PyObject_SetItem`` with the page number boxed into a new ``int`` (~250 of a 4 KiB
    write's ~9,300 instructions; docs/data-path.md §9).
    """

    def __init__(self, memory: mmap.mmap | bytearray) -> None:
        self.memory = memory
        self.mem = memoryview(memory)
        self.used = _zero_map((len(memory) + MAP_PAGE_SIZE - 1) >> MAP_SHIFT)
        # A live read-only view of ``used``, for the scans of :meth:`run_at`.
        self._used_bytes = memoryview(self.used)

    def read(self, views: list[memoryview], offset: int, length: int) -> None:
        """Fill ``views`` (``length`` bytes in all) from ``offset``; holes read as zeroes."""
        mem = self.mem
        for v in views:
            n = len(v)
            _copy(v, mem[offset : offset + n])
            offset += n

    def write(self, views: list[memoryview], offset: int, length: int) -> None:
        """Store ``views`` (``length`` bytes in all) at ``offset``, then mark the pages."""
        memory = self.memory
        pos = offset
        for v in views:
            _store(memory, pos, v)
            pos += len(v)
        self.mark(offset, length)

    def mark(self, offset: int, length: int) -> None:
        """Record that ``[offset, offset + length)`` may hold data (call after writing it).

        The order matters when a write and a trim of the same pages run on two connections
        at once. A write copies, then marks; a trim clears the marks (:meth:`unmark`), then
        drops the pages. In every interleaving of those four steps a page left unmarked is
        a page that reads as zeroes, so block status never reports ``HOLE|ZERO`` for data.
        (With the former order, mark then copy against drop then unmark, the sequence drop,
        mark, copy, unmark left data unmarked.) A page may stay marked and read as zeroes:
        that only reports a zero page as data, which NBD allows.
        """
        if length <= 0:
            return
        used = self.used
        first: i64 = offset >> MAP_SHIFT
        last: i64 = (offset + length - 1) >> MAP_SHIFT
        for page in range(first, last + 1):
            used[page] = 1

    def unmark(self, first_page: int, end_page: int) -> None:
        """Pages ``[first_page, end_page)`` hold no data (call before dropping them)."""
        used = self.used
        first: i64 = first_page
        end: i64 = end_page
        for page in range(first, end):
            used[page] = 0

    def run_at(self, page: int) -> tuple[bool, int]:
        """Whether ``page`` may hold data, and the first page after it that differs in that
        (the map's length if none does): the run of pages that block status reports as one
        extent."""
        marks = self._used_bytes
        n = len(marks)
        marked = marks[page] != 0
        other = 0 if marked else 1
        pos = page + 1
        while pos < n:
            found = marks[pos : pos + MAP_CHUNK].tobytes().find(other)
            if found >= 0:
                return marked, pos + found
            pos += MAP_CHUNK
        return marked, n
