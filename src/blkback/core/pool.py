"""The per-ring free-page pool of xen-blkback (``get_free_page``/``put_free_pages``/``shrink``).

Rule 1: the pool only ever frees pages that are *in it*. A page handed out by :meth:`get`
is in flight until it comes back through :meth:`put`; :meth:`shrink` cannot see it, so it
can never free it (the seed's safety argument, blkback-spec §6.1).

Rule 2: the semantics are the kernel's, exactly (blkback-spec §1):

* LIFO: ``get`` pops the most recently ``put`` page; when the pool is empty it allocates a
  fresh page from the allocator, which is not counted in the pool.
* ``put`` pushes with **no cap check**: the pool may exceed ``max_buffer_pages`` until the
  ring's next loop pass trims it.
* ``shrink(target, batch)`` frees down to exactly ``min(size, target)`` pages, the most
  recently returned first, in batches of ``batch`` (counted in ``free_batches``). An
  allocator that frees at once gets one call per batch, as the kernel's
  ``gnttab_free_pages``; one that defers (``deferred_release``: the real mmap pages) gets the
  whole excess in one call and drops the frames when the shrink ends (``flush``), which is
  when the memory has left the process.

The pool is owned by one ring and used from that ring's thread only, like the kernel's
pool is used under its spinlock; it has no lock of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from blkback.core.pages import PageAllocator, Release


@dataclass(frozen=True, slots=True)
class PoolCounters:
    """A snapshot of a pool's counters."""

    pool_pages: int
    in_flight_pages: int
    peak_pool_pages: int
    peak_in_flight_pages: int
    pages_allocated: int
    pages_freed: int
    hits: int
    misses: int


class PagePool:
    """A LIFO stack of free page ids over an allocator."""

    __slots__ = (
        "_free",
        "allocator",
        "free_batches",
        "hits",
        "in_flight",
        "misses",
        "pages_allocated",
        "pages_freed",
        "peak_in_flight",
        "peak_pool",
    )

    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator = allocator
        self._free: list[int] = []  # top of the stack is the end of the list
        self.in_flight = 0
        self.peak_pool = 0
        self.peak_in_flight = 0
        self.pages_allocated = 0
        self.pages_freed = 0
        self.hits = 0
        self.misses = 0
        self.free_batches = 0  # batches of batch_free_pages freed (the kernel's unit)

    def __len__(self) -> int:
        return len(self._free)

    @property
    def size(self) -> int:
        """Pages in the pool (free, ready for reuse)."""
        return len(self._free)

    def get(self) -> int:
        """Take one page: the most recently returned one, or a new one if the pool is empty."""
        free = self._free
        if free:
            page = free.pop()
            self.hits += 1
        else:
            page = self.allocator.alloc()
            self.pages_allocated += 1
            self.misses += 1
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight
        return page

    def get_many(self, n: int) -> list[int]:
        """Take ``n`` pages, as ``n`` calls of :meth:`get` would, in the same order.

        If the allocator fails part-way, the pages already taken go back into the pool (as
        the kernel's ``xen_blkbk_map`` returns the batch gathered so far) and the error
        propagates.

        An allocator may offer ``alloc_many(m)``: the ids ``m`` calls of ``alloc`` would
        return, in one call, or the first of them only (a shorter list: it could not take
        the rest in bulk); the pool then takes the rest one by one with ``alloc``. If it
        raises, it has allocated nothing.
        """
        free = self._free
        k = n if n <= len(free) else len(free)
        if k == 1:  # a 4 KiB request alone: no slice, no deletion of one
            pages = [free.pop()]
        elif k:
            pages = free[-k:]
            del free[-k:]
            pages.reverse()
        else:
            pages = []
        self.hits += k
        self.in_flight += k
        if k < n:
            alloc_many = getattr(self.allocator, "alloc_many", None)
            if alloc_many is not None:
                try:
                    fresh: list[int] = alloc_many(n - k)
                except BaseException:
                    self.put(pages)
                    raise
                got = len(fresh)
                pages.extend(fresh)
                self.pages_allocated += got
                self.misses += got
                self.in_flight += got
                k += got
        if k < n:
            alloc = self.allocator.alloc
            append = pages.append
            try:
                for _ in range(n - k):
                    append(alloc())
            except BaseException:
                got = len(pages) - k
                self.pages_allocated += got
                self.misses += got
                self.in_flight += got
                self.put(pages)
                raise
            self.pages_allocated += n - k
            self.misses += n - k
            self.in_flight += n - k
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight
        return pages

    def put(self, pages: list[int]) -> None:
        """Return pages that were taken with :meth:`get`; no cap is applied here."""
        n = len(pages)
        if n > self.in_flight:
            raise ValueError(f"put of {n} pages but only {self.in_flight} are in flight")
        self.in_flight -= n
        free = self._free
        if n == 1:
            free.append(pages[0])  # a 4 KiB request's page: no extend through an iterator
        else:
            free.extend(pages)
        if len(free) > self.peak_pool:
            self.peak_pool = len(free)

    def shrink(self, target: int, batch: int = 10, release: Release = Release.NOW) -> int:
        """Free pool pages down to ``min(size, target)``, ``batch`` at a time; return the count.

        ``release`` is passed to the allocator's ``flush``: how soon the freed pages leave
        the process (a trim may keep or free them lazily, a squeeze frees them at once).
        """
        if target < 0:
            raise ValueError(f"shrink target must be >= 0, not {target}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, not {batch}")
        free = self._free
        excess = len(free) - target
        if excess <= 0:
            return 0
        allocator = self.allocator
        self.free_batches += (excess + batch - 1) // batch
        if getattr(allocator, "deferred_release", False):
            # The allocator releases nothing until flush(): the batches are accounting
            # only, so the whole excess goes over in one call (the ring's lock is held for
            # the whole pass either way). Most recently returned first, as ever.
            doomed = free[-excess:]
            del free[-excess:]
            doomed.reverse()
            allocator.free(doomed)
        else:
            allocator_free = allocator.free
            left = excess
            while left > 0:
                k = batch if batch < left else left
                chunk = free[-k:]
                del free[-k:]
                chunk.reverse()  # most recently returned first, as the kernel pops the head
                allocator_free(chunk)
                left -= k
        allocator.flush(release)
        self.pages_freed += excess
        return excess

    def counters(self) -> PoolCounters:
        """A snapshot of the counters."""
        return PoolCounters(
            pool_pages=len(self._free),
            in_flight_pages=self.in_flight,
            peak_pool_pages=self.peak_pool,
            peak_in_flight_pages=self.peak_in_flight,
            pages_allocated=self.pages_allocated,
            pages_freed=self.pages_freed,
            hits=self.hits,
            misses=self.misses,
        )

    def free_page_ids(self) -> list[int]:
        """The pool's page ids, top of the stack first (for tests and invariants)."""
        return self._free[::-1]
