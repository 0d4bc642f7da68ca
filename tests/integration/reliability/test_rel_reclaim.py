"""The allocator's live pages, which a dead connection's close returns to its pool."""

from __future__ import annotations

from blkback.core.pages import MmapAllocator


def test_live_ids_exclude_free_and_pending_pages() -> None:
    alloc = MmapAllocator(chunk_pages=8)
    pages = [alloc.alloc() for _ in range(5)]
    alloc.free(pages[:2])  # pending: frames not dropped yet
    assert sorted(alloc.live_ids()) == sorted(pages[2:])
    alloc.flush()
    assert sorted(alloc.live_ids()) == sorted(pages[2:])
    alloc.free(pages[2:])
    alloc.flush()
    assert alloc.live_ids() == []
    alloc.close()
