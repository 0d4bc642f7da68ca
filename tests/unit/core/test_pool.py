"""PagePool: the kernel's LIFO pool semantics on counted pages."""

from __future__ import annotations

import pytest

from blkback.core.counting import CountingAllocator
from blkback.core.pool import PagePool


def test_get_allocates_when_empty_and_reuses_lifo() -> None:
    alloc = CountingAllocator()
    pool = PagePool(alloc)
    a, b, c = pool.get(), pool.get(), pool.get()
    assert (pool.misses, pool.hits, pool.pages_allocated) == (3, 0, 3)
    pool.put([a])
    pool.put([b, c])
    # LIFO: the last page put comes out first.
    assert pool.get() == c
    assert pool.get() == b
    assert pool.get() == a
    assert pool.hits == 3


def test_get_many_matches_repeated_get() -> None:
    p1, p2 = PagePool(CountingAllocator()), PagePool(CountingAllocator())
    pages = p1.get_many(7)
    p1.put(pages)
    p2.put(p2.get_many(7))
    one_by_one = [p2.get() for _ in range(5)]
    assert p1.get_many(5) == one_by_one


def test_put_has_no_cap_and_shrink_is_exact_and_batched() -> None:
    alloc = CountingAllocator()
    pool = PagePool(alloc)
    pool.put(pool.get_many(37))
    assert len(pool) == 37
    batches: list[int] = []
    real_free = alloc.free

    def spy(pages: list[int]) -> None:
        batches.append(len(pages))
        real_free(pages)

    alloc.free = spy  # type: ignore[method-assign]
    assert pool.shrink(5, 10) == 32
    assert batches == [10, 10, 10, 2]
    assert pool.free_batches == 4
    assert len(pool) == 5
    assert pool.shrink(9, 10) == 0  # target above size: nothing to do
    assert alloc.live_pages == 5


def test_shrink_frees_most_recently_returned_first() -> None:
    alloc = CountingAllocator()
    pool = PagePool(alloc)
    pages = pool.get_many(4)
    pool.put(pages)
    top_first = pool.free_page_ids()
    pool.shrink(2, 10)
    assert pool.free_page_ids() == top_first[2:]


def test_in_flight_pages_are_never_freed() -> None:
    alloc = CountingAllocator()
    pool = PagePool(alloc)
    held = pool.get_many(8)
    pool.put(pool.get_many(4))
    pool.shrink(0, 3)
    assert len(pool) == 0
    assert pool.in_flight == 8
    assert alloc.live_pages == 8
    pool.put(held)
    assert pool.in_flight == 0


def test_double_put_is_detected() -> None:
    pool = PagePool(CountingAllocator())
    pages = pool.get_many(2)
    pool.put(pages)
    with pytest.raises(ValueError, match="in flight"):
        pool.put(pages)


def test_allocation_failure_returns_the_partial_batch() -> None:
    alloc = CountingAllocator(limit=5)
    pool = PagePool(alloc)
    pool.put(pool.get_many(2))
    with pytest.raises(MemoryError):
        pool.get_many(10)
    # The 2 pooled pages + 3 fresh ones were returned to the pool, none leaked.
    assert pool.in_flight == 0
    assert len(pool) == 5
    assert alloc.live_pages == 5


class BulkAllocator(CountingAllocator):
    """``alloc_many`` that hands out at most ``bulk`` pages per call (the rest: ``alloc``)."""

    def __init__(self, bulk: int, limit: int | None = None) -> None:
        super().__init__(limit)
        self.bulk = bulk
        self.bulk_calls = 0

    def alloc_many(self, n: int) -> list[int]:
        self.bulk_calls += 1
        return [self.alloc() for _ in range(min(n, self.bulk))]


def pool_state(pool: PagePool) -> tuple[object, ...]:
    return (pool.free_page_ids(), pool.counters(), pool.in_flight)


@pytest.mark.parametrize("bulk", [0, 3, 100])
def test_alloc_many_may_hand_out_part_and_the_rest_come_one_by_one(bulk: int) -> None:
    plain, fast = PagePool(CountingAllocator()), PagePool(BulkAllocator(bulk))
    for pool in (plain, fast):
        pool.put(pool.get_many(4))
    for n in (0, 2, 9, 1, 12):
        assert fast.get_many(n) == plain.get_many(n)
        assert pool_state(fast) == pool_state(plain)
    assert isinstance(fast.allocator, BulkAllocator)
    assert fast.allocator.bulk_calls == 4  # the calls that needed fresh pages (not 0, 2)


@pytest.mark.parametrize("bulk", [0, 3])
def test_allocation_failure_after_a_partial_bulk_matches_page_by_page(bulk: int) -> None:
    plain, fast = PagePool(CountingAllocator(limit=6)), PagePool(BulkAllocator(bulk, limit=6))
    for pool in (plain, fast):
        pool.put(pool.get_many(2))
        with pytest.raises(MemoryError):
            pool.get_many(10)  # 2 from the pool, 4 fresh (bulk, then one by one), then none
    assert pool_state(fast) == pool_state(plain)
    assert len(fast) == 6 and fast.in_flight == 0
    assert fast.allocator.live_pages == plain.allocator.live_pages == 6


@pytest.mark.parametrize(("target", "batch"), [(-1, 10), (0, 0)])
def test_shrink_rejects_bad_arguments(target: int, batch: int) -> None:
    with pytest.raises(ValueError):
        PagePool(CountingAllocator()).shrink(target, batch)
