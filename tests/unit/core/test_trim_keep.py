"""A trim keeps its pages mapped for reuse, then frees them lazily (``Release.KEEP``).

With ``max_buffer_pages=0`` under load every pass trims the pool to 0 and the next batch
takes the same pages again: kept mapped, they come back with no system call and no fault. The
ring frees what it keeps lazily (``MADV_FREE``, seen in the kernel's ``LazyFree`` count) once
the oldest kept trim is ``lru_interval_ms`` old, or at its first idle pass, and only then may
it rest. Real pages, the ring's clock injected.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

from blkback.clock import NS_PER_S, ManualClock
from blkback.core.device import Bus
from blkback.core.pages import MmapAllocator
from blkback.core.params import Params
from blkback.core.ring import Ring

N = 256  # 1 MiB of pages
KEPT_KIB = N * 4


def _lazy_free_kib() -> int:
    """The process's pages marked MADV_FREE and not yet taken (``/proc/self/smaps_rollup``)."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("LazyFree:"):
                return int(line.split()[1])
    raise AssertionError("no LazyFree line in /proc/self/smaps_rollup")


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NS_PER_S)


@pytest.fixture
def alloc() -> Iterator[MmapAllocator]:
    allocator = MmapAllocator()
    yield allocator
    allocator.flush()


@pytest.fixture
def ring(clock: ManualClock, alloc: MmapAllocator) -> Ring:
    bus = Bus(Params(max_buffer_pages=0, lru_interval_ms=100))
    return bus.add_device("d").add_ring(alloc, clock.now_ns())


def _batch(ring: Ring, alloc: MmapAllocator, clock: ManualClock) -> list[int]:
    """A batch of N written pages, then its pass (which trims the pool to 0)."""
    pages = ring.get_pages(N, clock.now_ns())
    for page in pages:
        alloc.view(page)[0] = 1
    ring.put_pages(pages)
    ring.loop_pass(clock.now_ns())
    assert len(ring.pool) == 0
    return pages


def test_the_next_batch_takes_the_trimmed_pages_back_without_a_fault(
    ring: Ring, alloc: MmapAllocator, clock: ManualClock
) -> None:
    lazy_before = _lazy_free_kib()
    first = _batch(ring, alloc, clock)
    assert alloc.release_counts().lazy == N  # trimmed: out of the pool, not handed out
    clock.advance_ms(1)
    faults_before = _minor_faults()
    again = _batch(ring, alloc, clock)
    assert _minor_faults() - faults_before < N // 10
    assert sorted(again) == sorted(first)
    assert alloc.release_counts().lazy_reused == N
    assert _lazy_free_kib() - lazy_before < KEPT_KIB // 10  # nothing was advised yet


def test_kept_pages_are_freed_lazily_once_the_oldest_trim_is_lru_interval_old(
    ring: Ring, alloc: MmapAllocator, clock: ManualClock
) -> None:
    lazy_before = _lazy_free_kib()
    _batch(ring, alloc, clock)
    clock.advance_ms(99)
    ring.loop_pass(clock.now_ns())  # a busy pass before the interval: still kept
    assert _lazy_free_kib() - lazy_before < KEPT_KIB // 10
    assert ring.kept_since_ns is not None
    clock.advance_ms(1)
    ring.loop_pass(clock.now_ns())
    assert _lazy_free_kib() - lazy_before >= 0.9 * KEPT_KIB
    assert ring.kept_since_ns is None
    counts = alloc.release_counts()
    assert (counts.lazy, counts.lazily_freed, counts.returned) == (N, N, 0)


def test_an_idle_pass_frees_kept_pages_lazily_and_only_then_may_the_ring_rest(
    ring: Ring, alloc: MmapAllocator, clock: ManualClock
) -> None:
    lazy_before = _lazy_free_kib()
    _batch(ring, alloc, clock)
    assert not ring.at_rest(clock.now_ns())  # its kept pages need the next pass
    clock.advance_ms(100)
    ring.loop_pass(clock.now_ns(), had_io=False)
    assert _lazy_free_kib() - lazy_before >= 0.9 * KEPT_KIB
    assert ring.at_rest(clock.now_ns())
