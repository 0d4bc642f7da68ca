"""Page allocators: where pool pages come from and where freed pages go.

xen-blkback takes pages with ``gnttab_alloc_pages`` and gives them back with
``gnttab_free_pages``; here a page is an integer id and an allocator maps ids to memory.

* :class:`MmapAllocator` backs pages with **private** anonymous mappings. Python's
  ``mmap.mmap(-1, n)`` is MAP_SHARED (shmem), on which ``MADV_DONTNEED`` frees nothing
  (nbd-notes §5.6), so we ask for ``MAP_PRIVATE | MAP_ANONYMOUS`` explicitly. Freeing a page
  ``madvise(MADV_DONTNEED)``\\ s its 4 KiB: the kernel drops the frame at once, RSS falls, and the
  next use of the slot faults in a fresh zero page, which is what a new allocation costs.
  Address space is mapped in chunks and kept (a chunk cannot be unmapped while memoryviews of
  it exist), so the only thing that stays is virtual address space, never resident memory.
* :class:`~blkback.core.counting.CountingAllocator` hands out ids with no memory behind them:
  for the simulator and for tests of the pool's bookkeeping (in its own module, because
  this one is compiled with the data path and the simulator subclasses that one).

Both reuse freed ids LIFO, so ids stay dense.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import enum
import errno
import mmap
import os
import resource
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from mypy_extensions import i64

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 4096  # 1 << PAGE_SHIFT (a literal: compiled, both are constants)


class Release(enum.Enum):
    """How freed pages go back to the system (an argument of ``flush``).

    ``LAZY``: a trim. ``MADV_FREE``: the kernel takes the frames whenever it needs memory,
    without swapping, and a page it has not taken yet is reused without a fault. ``NOW``: a
    squeeze or a close. ``MADV_DONTNEED`` of everything freed, lazily freed pages included:
    the frames leave at once, because under pressure the memory must leave now.
    """

    LAZY = "lazy"
    NOW = "now"


class PageAllocator(Protocol):
    """Source and sink of pages (``gnttab_alloc_pages`` / ``gnttab_free_pages``)."""

    def alloc(self) -> int:
        """Return the id of a new page (may raise MemoryError)."""
        ...

    def free(self, pages: Sequence[int]) -> None:
        """Give pages back to the system (possibly deferred until :meth:`flush`)."""
        ...

    def flush(self, release: Release = Release.NOW) -> None:
        """Finish giving back what :meth:`free` received (one call per shrink), as ``release``
        says (see :class:`Release`)."""
        ...

    @property
    def live_pages(self) -> int:
        """Pages handed out and not freed."""
        ...

    def release_counts(self) -> ReleaseCounts:
        """How many pages are held, lazily freed, and given back (for stats)."""
        ...


@dataclass(frozen=True, slots=True)
class ReleaseCounts:
    """Where an allocator's pages are.

    Attributes:
        held: handed out and not freed (a ring's pool plus its pages in flight).
        lazy: freed lazily and not reused since: the kernel may still hold their frames in
            the process (they count in RSS until it takes them, which needs no swap).
        lazily_freed: pages ever freed lazily (``MADV_FREE``).
        lazy_reused: pages handed out again while lazily freed (no page fault if the kernel
            had not taken them).
        returned: pages ever given back at once (``MADV_DONTNEED``), lazily freed ones
            included when a squeeze dropped them.
    """

    held: int
    lazy: int
    lazily_freed: int
    lazy_reused: int
    returned: int


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    return ctypes.CDLL(name, use_errno=True)


def _sort_pages(pages: list[int]) -> bool:
    """Sort ``pages`` (distinct ids) in place; whether they are one run of consecutive ids.

    A request's pages are usually one run, ascending or descending (:meth:`MmapAllocator.spans`):
    compiled, checking that in one pass and reversing costs about 6,000 instructions for a
    1 MiB request's 256 ids, ``list.sort`` 13,000 (its comparisons are generic).
    """
    n = len(pages)
    if n < 2:
        return n == 1
    first = pages[0]
    step: i64
    if pages[n - 1] - first == n - 1:
        step = 1
    elif first - pages[n - 1] == n - 1:
        step = -1
    else:
        pages.sort()
        return False
    # Native 64-bit integers: compiled, the loop then neither boxes nor checks for overflow.
    expected: i64 = first
    page: i64
    for page in pages:
        if page != expected:
            pages.sort()
            return False
        expected += step
    if step < 0:
        pages.reverse()
    return True


class MmapAllocator:
    """Real 4 KiB pages over private anonymous mappings; freeing returns them to the OS.

    ``deferred_release``: :meth:`free` only records pages and :meth:`flush` drops their
    frames, so the pool may hand over a whole shrink in one call (see ``PagePool.shrink``).

    Args:
        chunk_pages: pages mapped per chunk of address space (one mmap call each).
        mlock: try to pin pages in RAM (like Xen's ballooned frames, which never swap). The
            soft RLIMIT_MEMLOCK is the pinning budget, even for a process whose CAP_IPC_LOCK
            would let it pin more (root here): pinned pool pages are memory the host can never
            reclaim, so we stay inside what the administrator granted. When the budget is used
            up or the kernel refuses, pinning stops, ``warn`` is called once with the reason,
            and allocation goes on unpinned.
        warn: where the single degradation message goes.
    """

    deferred_release = True

    def __init__(
        self,
        chunk_pages: int = 256,
        *,
        mlock: bool = False,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        if chunk_pages < 1:
            raise ValueError("chunk_pages must be at least 1")
        self.chunk_pages = chunk_pages
        self._chunks: list[mmap.mmap] = []
        self._chunk_views: list[memoryview] = []
        self._views: list[memoryview] = []
        #: Every page's 4096 bytes by page id (the list grows with the chunks).
        self.page_views = self._views
        self._free_ids: list[int] = []  # slots with no frame (never touched, or dropped)
        self._lazy_ids: list[int] = []  # MADV_FREE'd: the frame may still be there
        self._pending: list[int] = []  # freed, not yet given back (until flush)
        self._live = 0
        self.pages_lazily_freed = 0
        self.pages_lazy_reused = 0
        self.pages_returned = 0
        self._mlock = mlock
        self._warn = warn
        self._libc = _load_libc() if mlock else None
        self._addrs: list[int] = []
        self._locked: set[int] = set()
        self.pinned_pages = 0
        self.mlock_error: str | None = None
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        self.pin_budget_pages = -1 if soft == resource.RLIM_INFINITY else soft // PAGE_SIZE
        if mlock and self._libc is None:
            self._stop_pinning("mlock unavailable: libc not found; pool pages are not pinned")

    # -- allocator protocol ---------------------------------------------------------------
    def alloc(self) -> int:
        # Lazily freed pages first: one the kernel has not taken is reused without a fault.
        if self._lazy_ids:
            page = self._lazy_ids.pop()
            self.pages_lazy_reused += 1
        else:
            if not self._free_ids:
                if self._pending:
                    self.flush()
                else:
                    self._map_chunk()
            page = self._free_ids.pop()
        self._live += 1
        if self._mlock:
            self._pin(page)
        return page

    def alloc_many(self, n: int) -> list[int]:
        """``n`` new pages, as ``n`` calls of :meth:`alloc` would give, in one call.

        The pages are not populated here (``MADV_POPULATE_WRITE`` was tried): faulting a
        request's pages in all at once charged a memory cgroup in bursts of up to 1024 pages,
        and in ``blkback repro``'s over-committed cgroup (squeeze off) the OOM killer then
        took the memory hog in 3 of 5 quick runs, where faulting them in as the payload
        arrives lets reclaim keep up. It saved little besides (max_buffer_pages=0: 1 MiB
        writes -56 % -> -44 %, 4 KiB within noise).
        """
        if self._mlock:
            pinned: list[int] = []
            try:
                for _ in range(n):
                    pinned.append(self.alloc())  # noqa: PERF401 (keep what was taken on error)
            except BaseException:
                # Give back what was taken (unpinned, dropped), as the unpinned path does.
                self.free(pinned)
                self.flush()
                raise
            return pinned
        out = self._take(self._lazy_ids, n)  # no fault if the kernel left them
        n_lazy = len(out)
        free_ids = self._free_ids
        try:
            while len(out) < n:
                if not free_ids:
                    if self._pending:
                        self.flush()
                    else:
                        self._map_chunk()
                out.extend(self._take(free_ids, n - len(out)))
        except BaseException:
            self._lazy_ids.extend(reversed(out[:n_lazy]))
            free_ids.extend(reversed(out[n_lazy:]))
            raise
        self.pages_lazy_reused += n_lazy
        self._live += n
        return out

    @staticmethod
    def _take(ids: list[int], n: int) -> list[int]:
        """Up to ``n`` ids from the top of the stack ``ids``, in the order ``pop`` gives."""
        k = min(n, len(ids))
        if not k:
            return []
        got = ids[-k:]
        del ids[-k:]
        got.reverse()
        return got

    def free(self, pages: Sequence[int]) -> None:
        # The frames are dropped in :meth:`flush`, at the end of the shrink: one madvise per
        # run of adjacent pages instead of one per batch. Each madvise of a multithreaded
        # process costs a TLB shootdown on every other CPU, which made a squeeze of 64 rings
        # of 1024 pages take ~80 ms with per-batch calls. Until then the slots are not
        # reusable, so a page can never be handed out and then zeroed under its new owner.
        if self._locked:
            for page in pages:
                self._unpin(page)
        self._live -= len(pages)
        self._pending.extend(pages)

    def flush(self, release: Release = Release.NOW) -> None:
        """Give back the pages freed since the last flush as ``release`` says.

        One ``madvise`` per run of adjacent pages; ``NOW`` gives back the lazily freed pages
        too, since under pressure memory must leave now.
        """
        pending = self._pending
        if release is Release.NOW:
            pending += self._lazy_ids
            self._lazy_ids.clear()
        if not pending:
            return
        pending.sort()
        lazy = release is Release.LAZY
        advice = mmap.MADV_FREE if lazy else mmap.MADV_DONTNEED
        for start, end in self._runs(pending):
            self._advise(advice, start, end)
        if lazy:
            self._lazy_ids += pending
            self.pages_lazily_freed += len(pending)
        else:
            self._free_ids += pending
            self.pages_returned += len(pending)
        pending.clear()

    def _runs(self, pages: list[int]) -> Iterator[tuple[int, int]]:
        """Runs ``(start, end)`` of adjacent ``pages`` (sorted), each inside one chunk."""
        chunk_pages = self.chunk_pages
        i = 0
        n = len(pages)
        while i < n:
            # The pages of one chunk are pages[i:j]; usually they are one run (a pool that
            # gave back whole chunks), which is checked without a loop in Python.
            first = pages[i]
            chunk_end = (first // chunk_pages + 1) * chunk_pages
            j = bisect.bisect_left(pages, chunk_end, i)
            last = pages[j - 1]
            if last - first == j - 1 - i:
                yield first, last + 1
            else:
                run_start = run_end = first
                for page in pages[i:j]:
                    if page == run_end:
                        run_end += 1
                        continue
                    yield run_start, run_end
                    run_start, run_end = page, page + 1
                yield run_start, run_end
            i = j

    def release_counts(self) -> ReleaseCounts:
        return ReleaseCounts(
            held=self._live,
            lazy=len(self._lazy_ids),
            lazily_freed=self.pages_lazily_freed,
            lazy_reused=self.pages_lazy_reused,
            returned=self.pages_returned,
        )

    def _advise(self, advice: int, start: int, end: int) -> None:
        """``madvise`` pages ``start`` to ``end - 1`` (all in one chunk)."""
        chunk_pages = self.chunk_pages
        self._chunks[start // chunk_pages].madvise(
            advice, (start % chunk_pages) * PAGE_SIZE, (end - start) * PAGE_SIZE
        )

    @property
    def live_pages(self) -> int:
        return self._live

    # -- buffers --------------------------------------------------------------------------
    def view(self, page: int) -> memoryview:
        """The page's 4096 bytes, writable, usable by preadv/pwritev/recvmsg_into/sendmsg."""
        return self._views[page]

    def views(self, pages: Sequence[int]) -> list[memoryview]:
        """Memoryviews of several pages, for scatter/gather I/O."""
        v = self._views
        return [v[p] for p in pages]

    def spans(self, pages: list[int], length: int) -> list[memoryview]:
        """The first ``length`` bytes of ``pages`` as few memoryviews as possible.

        Sorts ``pages`` in place (:func:`_sort_pages`) and merges runs of adjacent pages of
        one chunk into one view: a request's pages are usually one run (fresh ones are
        handed out ascending, reused ones come back as the descending run they were returned
        as), so a 1 MiB request costs one or a few iovecs and copies instead of 256. The
        data order is the order of the returned views; callers use the same list for every
        step of a request.
        """
        chunk_pages = self.chunk_pages
        chunk_views = self._chunk_views
        if _sort_pages(pages):
            c, o = divmod(pages[0], chunk_pages)
            if o + len(pages) <= chunk_pages:  # the usual request: one run in one chunk
                start = o * PAGE_SIZE
                return [chunk_views[c][start : start + length]]
        out: list[memoryview] = []
        n = len(pages)
        i = 0
        while i < n:
            # pages[i:j] are the pages of one chunk; usually one run, which is checked
            # without a loop in Python (a 1 MiB request has 256 pages).
            first = pages[i]
            c, o = divmod(first, chunk_pages)
            j = bisect.bisect_left(pages, (c + 1) * chunk_pages, i)
            base = chunk_views[c]
            if pages[j - 1] - first == j - 1 - i:
                out.append(base[o * PAGE_SIZE : (o + j - i) * PAGE_SIZE])
            else:
                start = prev = first
                for p in pages[i + 1 : j]:
                    if p == prev + 1:
                        prev = p
                        continue
                    o = start - c * chunk_pages
                    out.append(base[o * PAGE_SIZE : (o + prev - start + 1) * PAGE_SIZE])
                    start = prev = p
                o = start - c * chunk_pages
                out.append(base[o * PAGE_SIZE : (o + prev - start + 1) * PAGE_SIZE])
            i = j
        excess = len(pages) * PAGE_SIZE - length
        if excess > 0:
            out[-1] = out[-1][: len(out[-1]) - excess]
        return out

    def close(self) -> None:
        """Unmap all address space; every page must have been freed first.

        A chunk whose memory is still exported (a memoryview of one of its pages is alive
        somewhere) cannot be unmapped now; it is left to the garbage collector, and its frames
        were already dropped by ``free``.
        """
        if self._live:
            raise RuntimeError(f"allocator closed with {self._live} pages still in use")
        self.flush()
        for v in self._views:
            v.release()
        self._views.clear()
        for v in self._chunk_views:
            v.release()
        self._chunk_views.clear()
        self._free_ids.clear()
        self._lazy_ids.clear()
        self._addrs.clear()
        for chunk in self._chunks:
            try:
                chunk.close()
            except BufferError:
                pass
        self._chunks.clear()

    def live_ids(self) -> list[int]:
        """Ids handed out by :meth:`alloc` and not freed since (for cleanup at disconnect)."""
        free = set(self._free_ids)
        free.update(self._pending)  # freed, frames not dropped yet: not live either
        free.update(self._lazy_ids)
        return [i for i in range(len(self._views)) if i not in free]

    @property
    def mapped_pages(self) -> int:
        """Pages of address space mapped so far (resident or not)."""
        return len(self._views)

    # -- internals ------------------------------------------------------------------------
    def _map_chunk(self) -> None:
        size = self.chunk_pages * PAGE_SIZE
        try:
            chunk = mmap.mmap(
                -1,
                size,
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except OSError as exc:
            # mmap reports ENOMEM (RLIMIT_AS, overcommit refused) as OSError; the allocator
            # protocol says MemoryError, which the server answers with an ENOMEM reply.
            if exc.errno == errno.ENOMEM:
                raise MemoryError(f"cannot map {size} bytes for pool pages") from exc
            raise
        base_id = len(self._views)
        self._chunks.append(chunk)
        whole = memoryview(chunk)
        self._chunk_views.append(whole)
        self._views.extend(
            whole[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(self.chunk_pages)
        )
        if self._mlock:
            self._addrs.append(ctypes.addressof(ctypes.c_char.from_buffer(chunk)))
        # Highest id last so that pop() hands out the chunk's pages in ascending order.
        self._free_ids.extend(range(base_id + self.chunk_pages - 1, base_id - 1, -1))

    def _page_addr(self, page: int) -> int:
        return self._addrs[page // self.chunk_pages] + (page % self.chunk_pages) * PAGE_SIZE

    def _pin(self, page: int) -> None:
        assert self._libc is not None
        if 0 <= self.pin_budget_pages <= self.pinned_pages:
            self._stop_pinning(
                f"mlock of pool pages stopped at the RLIMIT_MEMLOCK budget of "
                f"{self.pin_budget_pages * PAGE_SIZE // 1024} KiB ({self.pinned_pages} pages); "
                "further pool pages are not pinned"
            )
            return
        if self._libc.mlock(ctypes.c_void_p(self._page_addr(page)), ctypes.c_size_t(PAGE_SIZE)):
            err = ctypes.get_errno()
            self._stop_pinning(
                f"mlock of pool pages stopped after {self.pinned_pages} pages "
                f"({self.pinned_pages * PAGE_SIZE // 1024} KiB): {os.strerror(err)}; "
                "RLIMIT_MEMLOCK is too low here, so further pool pages are not pinned"
            )
            return
        self._locked.add(page)
        self.pinned_pages += 1

    def _unpin(self, page: int) -> None:
        if page in self._locked:
            assert self._libc is not None
            self._libc.munlock(ctypes.c_void_p(self._page_addr(page)), ctypes.c_size_t(PAGE_SIZE))
            self._locked.discard(page)
            self.pinned_pages -= 1

    def _stop_pinning(self, message: str) -> None:
        self._mlock = False
        self.mlock_error = message
        if self._warn is not None:
            self._warn(message)
