"""An allocator of page ids with no memory behind them: the simulator's and the tests'.

Not in :mod:`blkback.core.pages`, which is compiled with the data path (``blkback._native``):
an interpreted class (the simulator's ``HostAllocator``, tests' recording allocators) cannot
subclass a compiled one.
"""

from __future__ import annotations

from collections.abc import Sequence

from blkback.core.pages import Release, ReleaseCounts


class CountingAllocator:
    """Pages without memory: ids only. ``limit`` makes :meth:`alloc` fail like a full host."""

    def __init__(self, limit: int | None = None) -> None:
        self._next = 0
        self._free_ids: list[int] = []
        self._live = 0
        self.limit = limit
        self.allocs = 0
        self.frees = 0

    def alloc(self) -> int:
        if self.limit is not None and self._live >= self.limit:
            raise MemoryError("page allocation failed: allocator limit reached")
        self._live += 1
        self.allocs += 1
        if self._free_ids:
            return self._free_ids.pop()
        page = self._next
        self._next += 1
        return page

    def free(self, pages: Sequence[int]) -> None:
        self._live -= len(pages)
        self.frees += len(pages)
        self._free_ids.extend(pages)

    def flush(self, release: Release = Release.NOW) -> None:
        return

    @property
    def live_pages(self) -> int:
        return self._live

    def release_counts(self) -> ReleaseCounts:
        return ReleaseCounts(self._live, 0, 0, 0, self.frees)

    def released_ids(self) -> list[int]:
        """Ids freed and not handed out again (for invariant checks)."""
        return list(self._free_ids)
