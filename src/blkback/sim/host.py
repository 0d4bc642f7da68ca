"""The backend host ("dom0"): RAM, reclaim with watermarks, kswapd, direct reclaim and swap.

Memory is counted in 4 KiB pages, as integers, never as page objects:

``used = fixed + file + anon resident + pool pages (blkback's, in pools and in flight)``

* **fixed**: kernel, slab, Xen tools and everything else that is neither reclaimable nor
  blkback's.
* **file**: page cache. Reclaim takes it first (clean pages, no I/O, no pswpout) down to a
  floor (the file working set, which would refault at once below it).
* **anon**: each dom0 process has a working set split in a hot part and a cold part, each with
  a resident and a swapped count. The anonymous LRU is modelled by its order, not its
  entries: reclaim evicts cold (inactive) pages first, across processes in proportion to
  their cold resident pages, then hot (active) ones. Every evicted page is one pswpout. A
  process touches its pages at a rate per part; a touch of a swapped page is a major fault:
  one pswpin, and one free page is needed (which may itself enter direct reclaim). Faults are
  accounted every ``mem_tick_ms`` from the expected count (fractions carried over).
* **pool pages** are Xen ballooned frames taken from dom0: they occupy RAM and can never be
  swapped. :class:`HostAllocator` (a :class:`~blkback.core.counting.CountingAllocator`) charges
  every page the pools allocate and credits every page they free.

Watermarks as in Linux (``mm/page_alloc.c``): ``min`` from ``min_free_kbytes`` (default
``sqrt(16 * RAM_KiB)``), ``low = min + max(min/4, RAM * watermark_scale_factor / 10000)``,
``high = low + (low - min)``. An allocation that would leave fewer than ``low`` free pages wakes
kswapd; one that would leave fewer than ``min`` runs direct reclaim first and fails with
MemoryError when nothing can be reclaimed. kswapd reclaims in steps of ``SWAP_CLUSTER_MAX``
(32) pages until ``high`` is free; a step takes the time the swap device needs to write the
anonymous pages it evicted. Every kswapd step and every direct reclaim calls ``shrink_slab``,
which is where the shrinker reaches blkback: ``bus.reclaim_memory(now, level)`` (kswapd:
MEDIUM, direct reclaim: CRITICAL; the kernel policy ignores the level). With
``shrinker=False`` the host is Linux 5.4, where blkback registers no shrinker.

**The repro's dom0 (calibration).** ``blkback repro`` runs dom0 as a cgroup v1 memory child,
and its pool pages are the server's anonymous memory. Three options model that host:

* ``memcg``: RAM is the cgroup's limit. There are no watermarks and no kswapd (cgroup v1 has
  no background reclaim): a charge that would exceed the limit reclaims first, in the
  charging task (``try_to_free_mem_cgroup_pages``, at least ``SWAP_CLUSTER_MAX`` pages).
* ``report_every_pages`` / ``report_delay_ms``: the pressure reports reach blkback through
  vmpressure, not a shrinker: one event per ``vmpressure_win`` (512) pages reclaimed, read by
  the server's monitor thread ``report_delay_ms`` later. 0 / 0 is the in-kernel shrinker.
* ``pool_swappable``: pool pages are ordinary anonymous pages, not ballooned frames. Free pool
  pages are the coldest anonymous pages (their ring idles for seconds, the hog touches its own
  pages every few ms), so reclaim evicts them first, from the ring idle longest. Per ring the
  swapped pages are the bottom of the LIFO stack (returned longest ago): a ``get`` that reaches
  them faults them back in (pswpin), and a shrink that frees them drops their swap entries
  (``MADV_DONTNEED``: no pswpin). Reclaim then takes cold, then hot process pages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from blkback.clock import NS_PER_MS, NS_PER_S
from blkback.core.counting import CountingAllocator
from blkback.core.device import Bus
from blkback.core.pages import PAGE_SIZE
from blkback.core.policy import PressureLevel
from blkback.core.ring import Ring
from blkback.sim.engine import EventLoop

MIB_PAGES = 2**20 // PAGE_SIZE
SWAP_CLUSTER_MAX = 32


@dataclass(slots=True)
class HostConfig:
    """Size and behaviour of the backend host's memory (all sizes in MiB)."""

    ram_mib: int = 2048
    fixed_mib: int = 760  # kernel, slab, xenstored, qemu, toolstack: not reclaimable
    file_mib: int = 200  # page cache at start
    file_min_mib: int = 120  # the file working set reclaim will not go below
    swap_mib: int = 4096
    procs: int = 8  # dom0 processes with anonymous working sets
    proc_anon_mib: int = 112  # working set of each
    hot_fraction: float = 0.9  # part of each working set that is hot
    hot_touch_per_s: float = 2000.0  # distinct hot pages touched per second per process
    cold_touch_per_s: float = 5.0  # distinct cold pages touched per second per process
    swap_write_mbps: float = 120.0  # swap device write bandwidth (kswapd step time)
    min_free_kbytes: int = 0  # 0: Linux's default sqrt(16 * RAM_KiB)
    watermark_scale_factor: int = 10
    mem_tick_ms: float = 10.0
    shrinker: bool = True  # False: Linux 5.4 (no blkback shrinker)
    memcg: bool = False  # dom0 is a cgroup v1 limit: no watermarks, no kswapd
    pool_swappable: bool = False  # pool pages are swappable anonymous memory (blkback repro)
    report_every_pages: int = 0  # vmpressure: one report per this many pages reclaimed
    report_delay_ms: float = 0.0  # time from the report to reclaim_memory (monitor thread)


@dataclass(slots=True)
class Proc:
    """One dom0 process's anonymous working set (page counts)."""

    name: str
    hot: int
    cold: int
    hot_res: int
    cold_res: int
    hot_rate: float
    cold_rate: float
    carry_hot: float = 0.0
    carry_cold: float = 0.0


class Host:
    """dom0's memory and its reclaim. Owns the pool allocator of every ring on ``bus``."""

    def __init__(self, cfg: HostConfig, loop: EventLoop, bus: Bus) -> None:
        self.cfg = cfg
        self.loop = loop
        self.bus = bus
        self.total = cfg.ram_mib * MIB_PAGES
        ram_kib = cfg.ram_mib * 1024
        min_kib = cfg.min_free_kbytes or int(math.sqrt(ram_kib * 16))
        if cfg.memcg:
            self.wm_min = self.wm_low = self.wm_high = 0
        else:
            self.wm_min = max(1, min_kib // 4)
            gap = max(self.wm_min // 4, self.total * cfg.watermark_scale_factor // 10000)
            self.wm_low = self.wm_min + gap
            self.wm_high = self.wm_low + gap
        self.fixed = cfg.fixed_mib * MIB_PAGES
        self.file = cfg.file_mib * MIB_PAGES
        self.file_min = min(self.file, cfg.file_min_mib * MIB_PAGES)
        self.swap_total = cfg.swap_mib * MIB_PAGES
        self.swap_used = 0
        per = cfg.proc_anon_mib * MIB_PAGES
        hot = int(per * cfg.hot_fraction)
        self.procs = [
            Proc(
                f"proc{i}",
                hot,
                per - hot,
                hot,
                per - hot,
                cfg.hot_touch_per_s,
                cfg.cold_touch_per_s,
            )
            for i in range(cfg.procs)
        ]
        self.pool_pages = 0  # blkback pages held (in pools and in flight)
        # pool_swappable: swapped pages at the bottom of each ring's pool, and their total
        self.pool_swapped: dict[Ring, int] = {}
        self.pool_swapped_total = 0
        self._faulting: Ring | None = None  # the ring whose pool pages are faulting in
        self.rings: list[Ring] = []  # set by the scenario (reclaim looks for idle pools)
        self._report_acc = 0
        self.reports = 0
        self.used = self.fixed + self.file + self.anon_resident()
        if self.used > self.total - self.wm_high:
            raise ValueError(
                f"host does not fit: {self.used / MIB_PAGES:.0f} MiB used at start "
                f"of {cfg.ram_mib} MiB"
            )
        # counters (the /proc/vmstat names where there is one)
        self.pswpin = 0
        self.pswpout = 0
        self.pgsteal_file = 0
        self.kswapd_wakeups = 0
        self.kswapd_steps = 0
        self.direct_reclaims = 0
        self.shrinker_calls = 0
        self.alloc_failures = 0
        self.fault_stalls = 0  # faults deferred because no page could be reclaimed
        self.min_free_seen = self.total - self.used
        self.peak_pool_pages = 0
        self._kswapd_running = False
        self._swap_ns_per_page = int(PAGE_SIZE / (cfg.swap_write_mbps * 1e6) * NS_PER_S)
        self._tick_ns = int(cfg.mem_tick_ms * NS_PER_MS)
        self.allocator = HostAllocator(self)
        loop.after(self._tick_ns, self._tick)

    # -- accounting -----------------------------------------------------------------------
    def anon_resident(self) -> int:
        return sum(p.hot_res + p.cold_res for p in self.procs)

    @property
    def free(self) -> int:
        return self.total - self.used

    def check(self) -> None:
        """Assert the conservation of pages (for tests)."""
        resident_pool = self.pool_pages - self.pool_swapped_total
        expected = self.fixed + self.file + self.anon_resident() + resident_pool
        assert self.used == expected, (self.used, expected)
        assert 0 <= self.used <= self.total, (self.used, self.total)
        assert self.pool_pages == self.allocator.live_pages
        assert self.pool_swapped_total == sum(self.pool_swapped.values())
        for ring, s in self.pool_swapped.items():
            assert 0 <= s <= len(ring.pool), (s, len(ring.pool))
        procs_swapped = sum(p.hot - p.hot_res + p.cold - p.cold_res for p in self.procs)
        assert self.swap_used == procs_swapped + self.pool_swapped_total

    # -- allocation -----------------------------------------------------------------------
    def charge(self, n: int, *, fail: bool) -> int:
        """Take ``n`` free pages for an allocation; reclaim first if needed.

        Returns how many were taken (all ``n``, or fewer when reclaim could not make room and
        ``fail`` is False; with ``fail`` True it takes all or raises MemoryError).
        """
        if self.total - self.used - n < self.wm_min:
            self._direct_reclaim(self.used + n + self.wm_min - self.total)
            room = self.total - self.used - self.wm_min
            if room < n:
                if fail:
                    self.alloc_failures += 1
                    raise MemoryError("dom0 out of memory: nothing left to reclaim")
                n = max(0, room)
        self.used += n
        free = self.total - self.used
        if free < self.min_free_seen:
            self.min_free_seen = free
        if free < self.wm_low and not self._kswapd_running:
            self._wake_kswapd()
        return n

    # -- reclaim --------------------------------------------------------------------------
    def _shrink_slab(self, level: PressureLevel) -> None:
        cfg = self.cfg
        if not cfg.shrinker:
            return
        self.shrinker_calls += 1
        if cfg.report_every_pages or cfg.report_delay_ms:
            return  # vmpressure: reports come from _reclaimed, per window of pages
        self.reports += 1
        self.bus.reclaim_memory(self.loop.now, level)

    def _reclaimed(self, pages: int, level: PressureLevel) -> None:
        """vmpressure: count reclaimed pages; a full window is one report, delivered later."""
        cfg = self.cfg
        if not cfg.shrinker or not (cfg.report_every_pages or cfg.report_delay_ms):
            return
        self._report_acc += pages
        win = max(1, cfg.report_every_pages)
        if self._report_acc < win:
            return
        self._report_acc %= win
        self.loop.after(int(cfg.report_delay_ms * NS_PER_MS), self._deliver, level)

    def _deliver(self, level: PressureLevel, now: int) -> None:
        self.reports += 1
        self.bus.reclaim_memory(now, level)

    def _reclaim_lru(self, want: int) -> tuple[int, int]:
        """Evict up to ``want`` pages: file above its floor first, then anon, cold before hot.

        Returns (file pages dropped, anon pages swapped out).
        """
        got_file = min(want, self.file - self.file_min)
        if got_file > 0:
            self.file -= got_file
            self.pgsteal_file += got_file
        else:
            got_file = 0
        want -= got_file
        got_anon = 0
        swap_room = self.swap_total - self.swap_used
        want = min(want, swap_room)
        if self.cfg.pool_swappable and want > 0:
            got_pool = self._evict_pools(want)
            got_anon += got_pool
            want -= got_pool
        for part in ("cold", "hot"):
            if want <= 0:
                break
            res_total = sum(getattr(p, f"{part}_res") for p in self.procs)
            if res_total == 0:
                continue
            take_total = min(want, res_total)
            left = take_total
            # proportional to each process's resident pages of this part; remainder in order
            for p in self.procs:
                res = getattr(p, f"{part}_res")
                k = min(res, take_total * res // res_total, left)
                setattr(p, f"{part}_res", res - k)
                left -= k
            for p in self.procs:
                if left == 0:
                    break
                res = getattr(p, f"{part}_res")
                k = min(res, left)
                setattr(p, f"{part}_res", res - k)
                left -= k
            got_anon += take_total
            want -= take_total
        self.swap_used += got_anon
        self.pswpout += got_anon
        self.used -= got_file + got_anon
        return got_file, got_anon

    def _evict_pools(self, want: int) -> int:
        """Swap out free pool pages, from the ring idle longest; return how many."""
        got = 0
        swapped = self.pool_swapped
        faulting = self._faulting
        for ring in sorted(self.rings, key=_last_io):
            if ring is faulting:
                continue
            s = swapped.get(ring, 0)
            k = min(len(ring.pool) - s, want - got)
            if k > 0:
                swapped[ring] = s + k
                got += k
                if got >= want:
                    break
        self.pool_swapped_total += got
        return got

    def pool_get(self, ring: Ring, n: int) -> None:
        """Before ``ring`` takes ``n`` pages: fault in the swapped pool pages they reach."""
        swapped = self.pool_swapped
        while True:
            s = swapped.get(ring, 0)
            size = len(ring.pool)
            faults = min(n, size) - (size - s)
            if faults <= 0:
                return
            # MemoryError: nothing changed, the request waits. The charge's reclaim does not
            # take this ring's pool pages meanwhile (the kernel's page lock keeps reclaim off
            # a page under fault); without that, a host whose only reclaimable memory was
            # this pool swapped out what it faulted in, round after round, for ever.
            self._faulting = ring
            try:
                self.charge(faults, fail=True)
            finally:
                self._faulting = None
            swapped[ring] -= faults
            self.pool_swapped_total -= faults
            self._swapped_in(faults)

    def pool_pass(self, ring: Ring, now: int, *, had_io: bool, woken: bool = False) -> int:
        """``ring.loop_pass``; swapped pages it frees lose their swap entries (no pswpin)."""
        freed = ring.loop_pass(now, had_io=had_io, woken=woken)
        s = self.pool_swapped.get(ring, 0)
        if freed and s > len(ring.pool):
            dropped = s - len(ring.pool)
            self.pool_swapped[ring] = s - dropped
            self.pool_swapped_total -= dropped
            self.swap_used -= dropped
            self.used += dropped  # the allocator credited them, but they were not resident
        return freed

    def _direct_reclaim(self, need: int) -> None:
        self.direct_reclaims += 1
        self._shrink_slab(PressureLevel.CRITICAL)
        f, a = self._reclaim_lru(max(need, SWAP_CLUSTER_MAX))
        self._reclaimed(f + a, PressureLevel.CRITICAL)

    def _wake_kswapd(self) -> None:
        self._kswapd_running = True
        self.kswapd_wakeups += 1
        self.loop.after(0, self._kswapd_step)

    def _kswapd_step(self, _arg: object, now: int) -> None:
        self.kswapd_steps += 1
        self._shrink_slab(PressureLevel.MEDIUM)
        short = self.wm_high - (self.total - self.used)
        if short <= 0:
            self._kswapd_running = False
            return
        _file, anon = self._reclaim_lru(min(short, SWAP_CLUSTER_MAX))
        self._reclaimed(_file + anon, PressureLevel.MEDIUM)
        if _file + anon == 0:
            self._kswapd_running = False  # nothing reclaimable: kswapd gives up and sleeps
            return
        self.loop.at(now + max(20_000, anon * self._swap_ns_per_page), self._kswapd_step)

    # -- dom0 processes ---------------------------------------------------------------------
    def _tick(self, _arg: object, now: int) -> None:
        dt = self._tick_ns / NS_PER_S
        for p in self.procs:
            sw_hot = p.hot - p.hot_res
            sw_cold = p.cold - p.cold_res
            if sw_hot:
                p.carry_hot += p.hot_rate * dt * sw_hot / p.hot
                k = int(p.carry_hot)
                if k:
                    k = min(k, sw_hot)
                    got = self.charge(k, fail=False)
                    p.carry_hot -= got
                    p.hot_res += got
                    self._swapped_in(got)
                    if got < k:
                        self.fault_stalls += k - got
            if sw_cold:
                p.carry_cold += p.cold_rate * dt * sw_cold / p.cold
                k = int(p.carry_cold)
                if k:
                    k = min(k, sw_cold)
                    got = self.charge(k, fail=False)
                    p.carry_cold -= got
                    p.cold_res += got
                    self._swapped_in(got)
                    if got < k:
                        self.fault_stalls += k - got
        if self.pool_pages > self.peak_pool_pages:
            self.peak_pool_pages = self.pool_pages
        if self.total - self.used < self.wm_low and not self._kswapd_running:
            self._wake_kswapd()
        self.loop.at(now + self._tick_ns, self._tick)

    def _swapped_in(self, n: int) -> None:
        self.pswpin += n
        self.swap_used -= n

    def counters(self) -> dict[str, int]:
        """The vmstat-like counters."""
        return {
            "pswpin": self.pswpin,
            "pswpout": self.pswpout,
            "pgsteal_file": self.pgsteal_file,
            "kswapd_wakeups": self.kswapd_wakeups,
            "kswapd_steps": self.kswapd_steps,
            "direct_reclaims": self.direct_reclaims,
            "shrinker_calls": self.shrinker_calls,
            "reports": self.reports,
            "alloc_failures": self.alloc_failures,
            "fault_stalls": self.fault_stalls,
            "min_free_pages": self.min_free_seen,
            "peak_pool_pages": self.peak_pool_pages,
        }


def _last_io(ring: Ring) -> int:
    return ring.last_io_ns


class HostAllocator(CountingAllocator):
    """Pool pages as ids (no memory), each one charged to the host's RAM while it lives."""

    def __init__(self, host: Host) -> None:
        super().__init__()
        self.host = host

    def alloc(self) -> int:
        host = self.host
        if host.total - host.used - 1 < host.wm_low:
            host.charge(1, fail=True)  # slow path: may reclaim, wake kswapd, or raise
        else:
            host.used += 1
        host.pool_pages += 1
        # CountingAllocator.alloc inlined (no limit here): the hottest call of a sweep
        self._live += 1
        self.allocs += 1
        ids = self._free_ids
        if ids:
            return ids.pop()
        page = self._next
        self._next += 1
        return page

    def alloc_many(self, n: int) -> list[int]:
        """What ``n`` calls of :meth:`alloc` would return, as long as each would take its fast
        path (no reclaim, no kswapd): the pool allocates the rest with :meth:`alloc`."""
        host = self.host
        room = host.total - host.used - host.wm_low  # alloc's fast path while room > 0
        if room < n:
            n = room if room > 0 else 0
            if not n:
                return []
        host.used += n
        host.pool_pages += n
        self._live += n
        self.allocs += n
        ids = self._free_ids
        k = n if n <= len(ids) else len(ids)
        if k:
            out = ids[-k:]
            del ids[-k:]
            out.reverse()  # pop() order
        else:
            out = []
        if k < n:
            first = self._next
            self._next = first + n - k
            out.extend(range(first, first + n - k))
        return out

    def free(self, pages: Sequence[int]) -> None:
        n = len(pages)
        host = self.host
        host.used -= n
        host.pool_pages -= n
        super().free(pages)
