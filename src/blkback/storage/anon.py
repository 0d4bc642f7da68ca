"""``memory:SIZE``: a sparse RAM disk in the server's own private anonymous memory.

Why not a memfd: every read and write of a memfd is a syscall through the kernel's shmem
path (page-cache lookup, page lock, copy), which measured as the largest single cost of the
server's memory cells. Here a read or write is a ``memcpy`` between the request's pool pages
and this mapping, done by the connection thread with no syscall, as nbdkit's memory plugin
does with its sparse array.

Sparse: the mapping is reserved, not touched; an untouched page reads as zero from the
kernel's shared zero page and costs no RAM. A byte per 4 KiB page records which pages may
hold data (set by writes, cleared by trims), so block status never has to ask the kernel
(``mincore`` would call a swapped-out page a hole, and a client that skips holes would then
lose data). Trim and zero drop whole pages with ``MADV_DONTNEED`` and clear partial edges.
The memory is the server's anonymous memory, so it is charged, reclaimed and swapped like
any other anonymous memory of the process.
"""

from __future__ import annotations

import mmap

from blkback.errors import ConfigError

from .base import (
    HOLE,
    MAX_SIZE,
    ZERO,
    Capabilities,
    buffers_length,
    check_read_range,
    check_write_range,
    format_size,
    refuse_readonly,
)
from .region import MAP_PAGE_SIZE, MemoryRegion

# The page map's unit, which is also what a trim drops whole (MADV_DONTNEED, 4 KiB pages).
PAGE = MAP_PAGE_SIZE
_MAX_EXTENTS = 1024


class AnonMemoryStorage(Capabilities):
    """Sparse memory export over a private anonymous mapping."""

    kind = "memory"

    def __init__(self, size: int, *, readonly: bool = False) -> None:
        """Reserve ``size`` bytes (rounded up to whole pages) of address space.

        Raises:
            ConfigError: Bad size, or the address space could not be reserved.
        """
        if not 0 < size <= MAX_SIZE:
            raise ConfigError(f"memory: size must be between 1 and {MAX_SIZE} bytes")
        self.size = size
        self.set_capabilities(readonly=readonly, inline=True)
        pages = (size + PAGE - 1) // PAGE
        try:
            self._map = mmap.mmap(
                -1,
                pages * PAGE,
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0),
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except OSError as exc:
            raise ConfigError(f"memory: cannot reserve {format_size(size)}: {exc}") from exc
        #: The whole disk and its page map; the server's fast path copies through it too.
        self.region = MemoryRegion(self._map)

    def direct_access(self) -> MemoryRegion:
        """The server copies to and from the region itself (which marks what it wrote)."""
        return self.region

    def __repr__(self) -> str:
        ro = ", readonly" if self.readonly else ""
        return f"memory({format_size(self.size)}{ro})"

    # -- data -----------------------------------------------------------------------------
    def preadv(self, bufs: list[memoryview], offset: int) -> None:
        """Copy ``[offset, offset + len)`` into ``bufs``; holes read as zeroes."""
        length = buffers_length(bufs)
        check_read_range(self.size, offset, length, "read")
        self.region.read(bufs, offset, length)

    def pwritev(self, bufs: list[memoryview], offset: int, fua: bool) -> None:
        """Copy ``bufs`` to ``offset`` (memory is as durable as it gets: FUA is free)."""
        refuse_readonly(self.readonly, "write")
        length = buffers_length(bufs)
        check_write_range(self.size, offset, length, "write")
        self.region.write(bufs, offset, length)

    def flush(self) -> None:
        return

    def cache(self, offset: int, length: int) -> None:
        check_read_range(self.size, offset, length, "cache")

    # -- holes ----------------------------------------------------------------------------
    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Drop the range: whole pages leave RAM, partial edges are zeroed."""
        refuse_readonly(self.readonly, "trim")
        check_read_range(self.size, offset, length, "trim")
        self._punch(offset, length)

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool, fua: bool) -> None:
        """Zero the range; always by dropping pages (allocating zero pages only wastes RAM)."""
        refuse_readonly(self.readonly, "zero")
        check_write_range(self.size, offset, length, "zero")
        self._punch(offset, length)

    def _punch(self, offset: int, length: int) -> None:
        if not length:
            return
        end = offset + length
        first_full = (offset + PAGE - 1) // PAGE * PAGE
        last_full = end // PAGE * PAGE
        mem = self.region.mem
        if first_full >= last_full:  # inside one page (or two partial pages)
            mem[offset:end] = bytes(length)
            return
        if offset < first_full:
            mem[offset:first_full] = bytes(first_full - offset)
        if last_full < end:
            mem[last_full:end] = bytes(end - last_full)
        # Unmark, then drop: see MemoryRegion.mark for why this order.
        self.region.unmark(first_full // PAGE, last_full // PAGE)
        self._map.madvise(mmap.MADV_DONTNEED, first_full, last_full - first_full)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Runs of data and holes from the page map, covering ``[offset, offset + length)``."""
        check_read_range(self.size, offset, length, "extents")
        if not length:
            return []
        region = self.region
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(out) < _MAX_EXTENTS:
            marked, nxt = region.run_at(pos // PAGE)
            flags = 0 if marked else HOLE | ZERO
            stop = min(nxt * PAGE, end)
            out.append((stop - pos, flags))
            pos = stop
        return out

    def close(self) -> None:
        """Release the mapping (once no request uses it)."""
        self.region.mem.release()
        try:
            self._map.close()
        except BufferError:
            pass
