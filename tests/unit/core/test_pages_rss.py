"""Real pages: freeing returns memory to the OS (RSS falls), and pages are usable I/O buffers."""

from __future__ import annotations

import itertools
import os
import resource
import socket
import subprocess
import sys
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from blkback.clock import NS_PER_S, ManualClock
from blkback.core.device import Bus
from blkback.core.pages import PAGE_SIZE, MmapAllocator, Release
from blkback.core.params import Params
from blkback.core.pool import PagePool


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


def test_shrinking_200_mib_returns_at_least_90_percent_to_the_os() -> None:
    alloc = MmapAllocator()
    pool = PagePool(alloc)
    n = 200 * 2**20 // PAGE_SIZE
    base = _rss_anon_kib()
    pages = pool.get_many(n)
    for p in pages:
        alloc.view(p)[0:8] = b"blkback!"  # fault every page in
    pool.put(pages)
    grown = _rss_anon_kib()
    assert grown - base >= 0.95 * 200 * 1024, f"pool did not become resident: {grown - base} KiB"
    assert pool.shrink(0, 10) == n
    assert pool.free_batches == (n + 9) // 10  # the kernel's unit, counted
    after = _rss_anon_kib()
    released_kib = grown - after
    assert released_kib >= 0.9 * 200 * 1024, f"only {released_kib} KiB left the process"
    assert alloc.live_pages == 0


def test_freed_page_comes_back_zeroed() -> None:
    alloc = MmapAllocator(chunk_pages=4)
    pool = PagePool(alloc)
    (page,) = pool.get_many(1)
    alloc.view(page)[:] = b"\xa5" * PAGE_SIZE
    pool.put([page])
    pool.shrink(0)
    (again,) = pool.get_many(1)
    assert again == page  # the slot is reused...
    assert bytes(alloc.view(again)) == bytes(PAGE_SIZE)  # ...but its old frame was dropped


def test_pages_are_scatter_gather_buffers() -> None:
    alloc = MmapAllocator(chunk_pages=8)
    pool = PagePool(alloc)
    pages = pool.get_many(3)
    payload = os.urandom(3 * PAGE_SIZE)
    with tempfile.TemporaryFile() as f:
        f.write(payload)
        f.flush()
        assert os.preadv(f.fileno(), alloc.views(pages), 0) == len(payload)
        assert b"".join(bytes(v) for v in alloc.views(pages)) == payload
        assert os.pwritev(f.fileno(), alloc.views(pages), len(payload)) == len(payload)
    a, b = socket.socketpair()
    with a, b:
        a.sendmsg(alloc.views(pages))
        out = pool.get_many(3)
        got = 0
        while got < len(payload):
            got += (
                b.recvmsg_into(alloc.views(out)[got // PAGE_SIZE :])[0]
                if got % PAGE_SIZE == 0
                else 0
            )
            if got % PAGE_SIZE:
                break
        assert got == len(payload)
        assert b"".join(bytes(v) for v in alloc.views(out)) == payload
    pool.put(pages + out)


def test_mlock_degrades_with_one_warning() -> None:
    messages: list[str] = []
    alloc = MmapAllocator(chunk_pages=256, mlock=True, warn=messages.append)
    pool = PagePool(alloc)
    budget = alloc.pin_budget_pages
    assert budget >= 0, "RLIMIT_MEMLOCK is unlimited here: nothing to degrade"
    pages = pool.get_many(budget + 100)  # past the budget (8 MiB on this kind of host)
    assert len(messages) == 1
    assert "mlock" in messages[0]
    assert "not pinned" in messages[0]
    assert 0 < alloc.pinned_pages <= budget
    more = pool.get_many(10)
    assert len(messages) == 1  # one warning, not one per page
    pages += more
    pool.put(pages)
    pool.shrink(0)
    assert alloc.pinned_pages == 0


def test_coalesced_free_drops_exactly_the_given_pages() -> None:
    alloc = MmapAllocator(chunk_pages=4)  # small chunks: runs cross chunk boundaries
    pages = [alloc.alloc() for _ in range(12)]
    for p in pages:
        alloc.view(p)[:4] = p.to_bytes(4, "little")
    gone = [pages[i] for i in (1, 2, 3, 4, 5, 9, 11)]  # a run across chunks 0|1, and singles
    alloc.free(gone[:3])
    alloc.free(gone[3:])
    assert alloc.live_pages == 5
    # Nothing is free but the pending pages: alloc releases them first, then reuses one, so a
    # later flush can never zero a page that has a new owner.
    fresh = alloc.alloc()
    alloc.view(fresh)[:4] = b"live"
    alloc.flush()
    assert bytes(alloc.view(fresh)[:4]) == b"live"
    for p in pages:
        if p == fresh:
            continue
        want = bytes(4) if p in gone else p.to_bytes(4, "little")
        assert bytes(alloc.view(p)[:4]) == want, p
    assert alloc.live_pages == 6


def test_spans_merge_adjacent_pages_within_chunks() -> None:
    alloc = MmapAllocator(chunk_pages=4)
    pages = [alloc.alloc() for _ in range(10)]  # ids 0..9 over chunks of 4
    for p in pages:
        alloc.view(p)[:] = bytes([p]) * PAGE_SIZE
    reused = [9, 8, 7, 6, 5, 3, 1, 0]  # a descending run, as a LIFO pool hands them back
    spans = alloc.spans(reused, 7 * PAGE_SIZE + 100)
    assert reused == [0, 1, 3, 5, 6, 7, 8, 9]  # sorted in place: the data order
    assert [len(s) for s in spans] == [2 * PAGE_SIZE, PAGE_SIZE, 3 * PAGE_SIZE, PAGE_SIZE + 100]
    data = b"".join(bytes(s) for s in spans)
    assert data == b"".join(bytes([p]) * PAGE_SIZE for p in reused)[: 7 * PAGE_SIZE + 100]
    spans[0][:1] = b"\xff"  # the spans are the pages' own memory, not copies
    assert alloc.view(0)[0] == 0xFF


_SPAN_ALLOC = MmapAllocator(chunk_pages=8)
_SPAN_PAGES = [_SPAN_ALLOC.alloc() for _ in range(40)]  # 5 chunks of 8
for _p in _SPAN_PAGES:
    _SPAN_ALLOC.view(_p)[:] = _p.to_bytes(2, "little") * (PAGE_SIZE // 2)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(_SPAN_PAGES), min_size=1, max_size=40, unique=True),
    st.integers(min_value=0, max_value=PAGE_SIZE - 1),
)
def test_spans_are_the_sorted_pages_merged_only_within_a_chunk(pages: list[int], cut: int) -> None:
    check_spans(pages, cut)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=39),
    st.integers(min_value=1, max_value=40),
    st.booleans(),
    st.integers(min_value=0, max_value=PAGE_SIZE - 1),
)
def test_spans_of_consecutive_pages_ascending_or_descending(
    first: int, n: int, descending: bool, cut: int
) -> None:
    # The usual request (a run, as a LIFO pool hands it back or a fresh chunk hands it
    # out) takes the path that checks the run instead of sorting: same spans, same order.
    run = _SPAN_PAGES[first : first + n]
    check_spans(run[::-1] if descending else list(run), cut)


def check_spans(pages: list[int], cut: int) -> None:
    """``spans`` of ``pages`` (the last one cut short by ``cut`` bytes), checked whole."""
    length = len(pages) * PAGE_SIZE - cut
    spans = _SPAN_ALLOC.spans(pages, length)
    assert pages == sorted(pages)
    want = b"".join(bytes(_SPAN_ALLOC.view(p)) for p in pages)[:length]
    assert b"".join(bytes(s) for s in spans) == want
    # Each span is one run of adjacent pages inside one chunk: as few spans as that allows.
    runs = 1 + sum(1 for a, b in itertools.pairwise(pages) if b != a + 1 or b % 8 == 0)
    assert len(spans) == runs


def test_alloc_many_hands_out_distinct_pages_like_alloc() -> None:
    alloc = MmapAllocator(chunk_pages=64)
    first = alloc.alloc_many(100)  # crosses a chunk boundary: two chunks mapped
    assert len(set(first)) == 100
    assert first == sorted(first)  # ascending, as alloc() hands a fresh chunk out
    assert alloc.live_pages == 100
    more = alloc.alloc_many(1000)
    assert not set(first) & set(more)
    for p in more:
        alloc.view(p)[:8] = p.to_bytes(8, "little")  # usable memory, each page its own
    assert all(bytes(alloc.view(p)[:8]) == p.to_bytes(8, "little") for p in more)
    alloc.free(first + more)
    alloc.flush()
    assert alloc.live_pages == 0
    again = alloc.alloc_many(50)  # freed slots are reused before new chunks are mapped
    assert set(again) <= set(first) | set(more)
    assert all(bytes(alloc.view(p)[:8]) == bytes(8) for p in again)  # freed: zero again
    alloc.free(again)
    alloc.close()


_ALLOC_MANY_UNDER_RLIMIT_AS = r"""
import resource
from blkback.core.pages import MmapAllocator
from blkback.core.pool import PagePool

for mlock in (True, False):
    alloc = MmapAllocator(chunk_pages=1024, mlock=mlock)  # 4 MiB chunks
    pool = PagePool(alloc)
    pool.put(pool.get_many(1))  # chunk 0 mapped before the limit
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 6 * 2**20, resource.RLIM_INFINITY))
    try:
        pool.get_many(3000)  # chunk 0, chunk 1 (fits), chunk 2: mmap fails with ENOMEM
    except MemoryError:
        pass
    else:
        raise SystemExit("the limit did not make the mapping fail")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert (len(pool), pool.in_flight) == (1, 0), (mlock, len(pool), pool.in_flight)
    assert alloc.live_pages == 1, (mlock, alloc.live_pages)  # the pool's page only
    assert alloc.pinned_pages <= 1, alloc.pinned_pages
    pool.shrink(0)
    alloc.close()  # raises if any page is still counted live
print("ok")
"""


def test_alloc_many_that_fails_part_way_gives_back_what_it_took() -> None:
    # A real ENOMEM: the address-space limit leaves room for one more chunk, not two.
    proc = subprocess.run(
        [sys.executable, "-c", _ALLOC_MANY_UNDER_RLIMIT_AS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _touch(alloc: MmapAllocator, pages: list[int]) -> None:
    for p in pages:
        alloc.view(p)[0] = 1


def _faults_reusing(release: Release) -> tuple[int, MmapAllocator]:
    """Minor faults of touching 1024 pool pages again after a shrink to 0."""
    alloc = MmapAllocator()
    pool = PagePool(alloc)
    pages = pool.get_many(1024)
    _touch(alloc, pages)
    pool.put(pages)
    pool.shrink(0, release=release)
    before = _minor_faults()
    again = pool.get_many(1024)
    _touch(alloc, again)
    faults = _minor_faults() - before
    pool.put(again)
    pool.shrink(0)
    return faults, alloc


def test_a_lazy_trim_is_reused_without_faults_and_an_immediate_one_faults_every_page() -> None:
    lazy_faults, alloc = _faults_reusing(Release.LAZY)
    counts = alloc.release_counts()
    assert counts.lazily_freed == 1024
    assert counts.lazy_reused == 1024
    assert lazy_faults < 100, lazy_faults  # MADV_FREE: the frames were still there
    immediate_faults, _ = _faults_reusing(Release.NOW)
    assert immediate_faults >= 900, immediate_faults  # MADV_DONTNEED: one fault per page


def test_a_squeeze_drops_pages_an_earlier_trim_freed_lazily() -> None:
    # max_buffer_pages=0: every pass trims the pool to 0, lazily. A squeeze then finds the
    # pool empty, yet the lazily freed pages must leave RSS at once.
    clock = ManualClock(NS_PER_S)
    bus = Bus(Params(max_buffer_pages=0))
    alloc = MmapAllocator()
    ring = bus.add_device("d").add_ring(alloc, clock.now_ns())
    n = 100 * 2**20 // PAGE_SIZE
    base = _rss_anon_kib()
    pages = ring.get_pages(n, clock.now_ns())
    _touch(alloc, pages)
    ring.put_pages(pages)
    ring.loop_pass(clock.now_ns())
    assert len(ring.pool) == 0
    assert alloc.release_counts().lazy == n
    grown = _rss_anon_kib()
    assert grown - base >= 0.9 * 100 * 1024  # lazily freed pages stay until the kernel needs them
    bus.reclaim_memory(clock.now_ns())
    ring.loop_pass(clock.now_ns(), had_io=False, woken=True)
    released_kib = grown - _rss_anon_kib()
    assert released_kib >= 0.9 * 100 * 1024, f"only {released_kib} KiB left the process"
    counts = alloc.release_counts()
    assert counts.lazy == 0
    assert counts.returned == n
    assert counts.held == 0
