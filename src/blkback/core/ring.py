"""A ring: one connection to a device (``xen_blkif_ring``), its page pool and its loop pass.

The kernel's ``xen_blkif_schedule`` loop waits for requests (at most ``LRU_INTERVAL`` = 100 ms),
handles a batch, then *on every iteration* shrinks the pool to the target (blkback-spec §2).
Here :meth:`Ring.loop_pass` is that iteration's bookkeeping without the waiting: the server
calls it after each batch and whenever :meth:`Ring.pass_due` says the interval has passed; the
simulator calls it from its event queue. The target comes from the ring's device
(:meth:`RingOwner.pool_target`), which asks its squeeze policy: a ring knows its owner only
through :class:`RingOwner`, so ``ring.py`` does not import ``device.py`` (which imports it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from blkback.clock import NS_PER_MS, NS_PER_S
from blkback.core.pages import PageAllocator, Release
from blkback.core.params import Params
from blkback.core.pool import PagePool

STATS_INTERVAL_NS: Final = 10 * NS_PER_S  # print_stats: every 10 s when log_stats is set
REFILL_WINDOW_NS: Final = NS_PER_S  # pages allocated this soon after a squeeze count as wasted


@dataclass(slots=True)
class RingStats:
    """Per-ring counters, the kernel's ``st_*`` plus blkback's own."""

    rd_req: int = 0  # reads
    wr_req: int = 0  # writes (and write-zeroes)
    oo_req: int = 0  # requests that found no free request slot
    f_req: int = 0  # flushes (and FUA writes)
    ds_req: int = 0  # discards (trims)
    rd_bytes: int = 0
    wr_bytes: int = 0
    other_req: int = 0  # cache, block status
    errors: int = 0
    alloc_failures: int = 0
    passes: int = 0
    idle_passes: int = 0
    woken_passes: int = 0
    rests: int = 0  # times the idle ring slept with no timed pass (see Ring.at_rest)
    polls: int = 0  # busy-poll windows spun after a batch (see core/polling.py)
    poll_hits: int = 0  # windows that found the next request
    polled_ns: int = 0  # time spent spinning in them
    pages_trimmed: int = 0  # freed down to max_buffer_pages
    pages_squeezed: int = 0  # freed because a squeeze (or a graded cap) held the target lower
    squeeze_passes: int = 0  # passes that freed pages because of a squeeze
    refill_after_squeeze_pages: int = 0  # pages allocated within 1 s of a squeeze (wasted)
    squeezed_alloc_pages: int = 0  # pages allocated while the device was squeezed
    extra: dict[str, int] = field(default_factory=dict)

    def requests(self) -> int:
        """Requests served so far, of every kind (a FUA write counts in ``wr`` and ``f``)."""
        return self.rd_req + self.wr_req + self.f_req + self.ds_req + self.other_req

    def as_dict(self) -> dict[str, int]:
        """All counters by name."""
        out = {
            "rd": self.rd_req,
            "wr": self.wr_req,
            "oo": self.oo_req,
            "f": self.f_req,
            "ds": self.ds_req,
            "other": self.other_req,
            "rd_bytes": self.rd_bytes,
            "wr_bytes": self.wr_bytes,
            "errors": self.errors,
            "alloc_failures": self.alloc_failures,
            "passes": self.passes,
            "idle_passes": self.idle_passes,
            "woken_passes": self.woken_passes,
            "rests": self.rests,
            "polls": self.polls,
            "poll_hits": self.poll_hits,
            "polled_ns": self.polled_ns,
            "pages_trimmed": self.pages_trimmed,
            "pages_squeezed": self.pages_squeezed,
            "squeeze_passes": self.squeeze_passes,
            "refill_after_squeeze_pages": self.refill_after_squeeze_pages,
            "squeezed_alloc_pages": self.squeezed_alloc_pages,
        }
        out.update(self.extra)
        return out


class RingOwner:
    """What a ring needs of its device (:class:`~blkback.core.device.Device` is one).

    A base class, not a ``Protocol``: compiled, a ring's calls into its device (the pool
    target, on every loop pass) are then direct calls rather than Python method lookups.
    """

    name: str  # the device's name, for the stats line
    params: Params  # the runtime parameters the ring's passes read

    def pool_target(self, last_io_ns: int, now_ns: int) -> int:
        """The pool size the squeeze in force allows a ring whose last I/O was at ``last_io_ns``."""
        raise NotImplementedError

    def squeezed(self, now_ns: int) -> bool:
        """Whether ``now_ns`` is inside the device's squeeze window."""
        raise NotImplementedError

    def emit_stats(self, line: str) -> None:
        """Deliver a ``log_stats`` line."""
        raise NotImplementedError


class Ring:
    """One connection's pool and loop-pass state. Used from one thread at a time."""

    def __init__(
        self, device: RingOwner, ring_id: int, allocator: PageAllocator, now_ns: int
    ) -> None:
        self.device = device
        self.ring_id = ring_id
        self.pool = PagePool(allocator)
        self.stats = RingStats()
        self.created_ns = now_ns
        self.last_pass_ns = now_ns
        self.last_io_ns = now_ns
        self.next_stats_ns = now_ns + STATS_INTERVAL_NS
        self._printed = (0, 0, 0, 0)
        self.last_squeeze_free_ns: int | None = None
        self.last_free_ns: int | None = None  # time of the last pass that freed pages
        self.wake_pending = False
        self.wake_ns: int | None = None
        self.waker: Callable[[], None] | None = None  # set by whoever runs the loop
        self.closed = False

    # -- pages ----------------------------------------------------------------------------
    def get_pages(self, n: int, now_ns: int) -> list[int]:
        """Take ``n`` pages for a request (allocating when the pool is empty)."""
        pool = self.pool
        misses_before = pool.misses
        try:
            pages = pool.get_many(n)
        except MemoryError:
            self.stats.alloc_failures += 1
            raise
        new = pool.misses - misses_before
        if new:
            last = self.last_squeeze_free_ns
            if last is not None and now_ns - last <= REFILL_WINDOW_NS:
                self.stats.refill_after_squeeze_pages += new
            if self.device.squeezed(now_ns):
                self.stats.squeezed_alloc_pages += new
        return pages

    def put_pages(self, pages: list[int]) -> None:
        """Give a finished request's pages back to the pool."""
        self.pool.put(pages)

    # -- the loop pass --------------------------------------------------------------------
    def pass_due(self, now_ns: int) -> bool:
        """Whether an idle ring must run its loop pass now (``lru_interval_ms`` elapsed)."""
        return now_ns - self.last_pass_ns >= self.device.params.lru_interval_ms * NS_PER_MS

    def next_pass_ns(self) -> int:
        """When the next idle pass is due."""
        return self.last_pass_ns + self.device.params.lru_interval_ms * NS_PER_MS

    def at_rest(self, now_ns: int) -> bool:
        """Whether this idle ring needs no timed pass until a request, squeeze or parameter change.

        The kernel wakes an idle ring every ``LRU_INTERVAL`` for a pass; that wake-up is a
        habit, not a semantic. A pass changes the pool only when the pool is above its target,
        and without a new event the target cannot fall below the pool: no squeeze is pending
        (its window would end, or a graded level would see the ring turn idle), no page is in
        flight (a worker returning pages could lift the pool above the target), and every
        event that could lower the target wakes the ring (``squeeze_wake`` is on: with it off,
        the kernel's lazy squeeze is what the timed pass reproduces). ``log_stats`` prints
        from timed passes, so it keeps them too.
        """
        params = self.device.params
        if not params.squeeze_wake or params.log_stats:
            return False
        pool = self.pool
        if pool.in_flight or self.device.squeezed(now_ns):
            return False
        return len(pool) <= self.target(now_ns)

    def target(self, now_ns: int) -> int:
        """The pool size this ring's pass would shrink to at ``now_ns``."""
        return self.device.pool_target(self.last_io_ns, now_ns)

    def loop_pass(self, now_ns: int, *, had_io: bool = True, woken: bool = False) -> int:
        """One iteration's tail of ``xen_blkif_schedule``: shrink the pool; return pages freed.

        Args:
            now_ns: the time of the pass.
            had_io: whether the iteration handled requests (False: the wait timed out).
            woken: whether a squeeze woke the ring for this pass.
        """
        device = self.device
        params = device.params
        stats = self.stats
        stats.passes += 1
        if woken:
            stats.woken_passes += 1
            self.wake_pending = False
            self.wake_ns = None
        if had_io:
            self.last_io_ns = now_ns
        else:
            stats.idle_passes += 1
        # A woken pass may be evaluated at an earlier instant than a pass the ring ran since.
        if now_ns > self.last_pass_ns:
            self.last_pass_ns = now_ns
        floor_before = params.max_buffer_pages
        target = device.pool_target(self.last_io_ns, now_ns)
        pool = self.pool
        # Pages above max_buffer_pages would have gone anyway: only the rest is squeeze.
        # (The lower of two reads: `ctl set` may change it while the policy reads it, and
        # a trim must not be counted as a squeeze then.)
        trim_floor = min(floor_before, params.max_buffer_pages)
        # A trim frees lazily (reused without a fault until the kernel needs the memory); a
        # squeeze frees at once, pages freed lazily before it included, because under
        # pressure the memory must leave now.
        freed = 0
        if len(pool) > target:
            release = self._release(target, trim_floor, now_ns)
            freed = pool.shrink(target, params.batch_free_pages, release)
        elif not had_io and self._release(target, trim_floor, now_ns) is Release.NOW:
            pool.allocator.flush(Release.NOW)
        if freed:
            self.last_free_ns = now_ns
            if target < trim_floor:
                size_before = len(self.pool) + freed
                by_trim = max(0, size_before - trim_floor)
                by_squeeze = freed - by_trim
                stats.pages_trimmed += by_trim
                stats.pages_squeezed += by_squeeze
                if by_squeeze:
                    stats.squeeze_passes += 1
                    self.last_squeeze_free_ns = now_ns
            else:
                stats.pages_trimmed += freed
        if params.log_stats and now_ns >= self.next_stats_ns:
            self.device.emit_stats(self.stats_line())
            self.reset_print_stats(now_ns)
        return freed

    def _release(self, target: int, trim_floor: int, now_ns: int) -> Release:
        """How the pages a pass frees leave the process (see :class:`Release`): at once
        under a squeeze (a target below the trim floor, or inside a squeeze window, which
        ``max_buffer_pages=0`` would not show), lazily for a trim."""
        if target < trim_floor or self.device.squeezed(now_ns):
            return Release.NOW
        return Release.LAZY

    def request_wake(self, now_ns: int | None = None) -> None:
        """Ask the ring's runner to run a pass now (a squeeze began at ``now_ns``).

        The runner should evaluate that pass at ``wake_ns``, the instant of the wake: a runner
        that serves many rings one after another (a reporter waking 64 idle rings) must not
        let the later rings see a window that closed while it was busy with the earlier ones.
        """
        self.wake_pending = True
        if now_ns is not None:
            self.wake_ns = now_ns
        if self.waker is not None:
            self.waker()

    # -- stats ----------------------------------------------------------------------------
    def stats_line(self) -> str:
        """The kernel's ``print_stats`` line, with blkback's pool numbers."""
        s = self.stats
        p = self.pool
        rd0, wr0, oo0, ds0 = self._printed
        return (
            f"{self.device.name}/{self.ring_id}: oo {s.oo_req - oo0:3d}  |  "
            f"rd {s.rd_req - rd0:4d}  |  wr {s.wr_req - wr0:4d}  |  f {s.f_req:4d}  |  "
            f"ds {s.ds_req - ds0:4d}  |  "
            f"pool: {len(p)}/{self.device.params.max_buffer_pages} in-flight {p.in_flight} "
            f"peak {p.peak_pool}"
        )

    def reset_print_stats(self, now_ns: int) -> None:
        """Start a new ``print_stats`` interval and re-arm its timer.

        The kernel zeroes rd/wr/oo/ds (not f) after printing; we keep the counters cumulative
        for ``ctl stats`` and print the interval's deltas instead, which reads the same.
        """
        s = self.stats
        self._printed = (s.rd_req, s.wr_req, s.oo_req, s.ds_req)
        self.next_stats_ns = now_ns + STATS_INTERVAL_NS

    def snapshot(self) -> dict[str, object]:
        """This ring's state for ``ctl stats --json``."""
        c = self.pool.counters()
        r = self.pool.allocator.release_counts()
        return {
            "id": self.ring_id,
            "pool_pages": c.pool_pages,
            "in_flight_pages": c.in_flight_pages,
            "peak_pool_pages": c.peak_pool_pages,
            "peak_in_flight_pages": c.peak_in_flight_pages,
            "pages_allocated": c.pages_allocated,
            "pages_freed": c.pages_freed,
            "hits": c.hits,
            "misses": c.misses,
            "pages_held": r.held,
            "pages_lazy": r.lazy,
            "pages_lazily_freed": r.lazily_freed,
            "pages_lazy_reused": r.lazy_reused,
            "pages_returned": r.returned,
            "last_pass_ms": self.last_pass_ns / NS_PER_MS,
            "last_free_ms": None if self.last_free_ns is None else self.last_free_ns / NS_PER_MS,
            "requests": self.stats.as_dict(),
        }
