"""Guests: blkfront rings, their workloads and the backing network volumes.

One :class:`Disk` is one ring of one virtual disk: the blkfront side (a queue of at most
``queue_depth`` requests, ``32 x ring_pages`` slots), the backend side (the core
:class:`~blkback.core.ring.Ring`: pages per request from its pool, the loop pass), and the
volume behind it.

**Requests.** A request carries up to 11 segments directly, or up to
``max_indirect_segments`` (Linux blkfront: 32; blkback accepts 256) through indirect
descriptor pages (one page per 512 segments). The backend takes one pool page per segment
plus the indirect pages, and puts the indirect pages back as soon as it has parsed them.

**Batching.** Guest I/O is handled in ticks of at most ``io_quantum_ms``: a tick completes every
request whose completion time has come (its pages go back to the pool), then the frontend
fills its free slots and the backend maps them (``get_pages``) and runs its loop pass
(``loop_pass(had_io=True)``), as ``xen_blkif_schedule`` does after ``do_block_io_op``. A tick
that only completes requests runs no pass: in the kernel completions do not wake the ring
thread. The quantum trades event count against timing detail; it stays below the squeeze
window it is compared with.

**Backend CPU.** Per ring, a serial CPU: mapping costs ``map_ns`` per segment, a fresh page
(pool miss) ``alloc_ns`` more, and each page the pass frees ``free_ns``. A request reaches the
volume when its mapping is done.

**Volume.** A FIFO server per disk: ``bytes / bandwidth`` of transfer after the previous
request, plus a fixed latency (a network volume). An optional burst credit lets the first
``burst_mb`` go at ``burst_mbps``.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blkback.clock import NS_PER_MS, NS_PER_S
from blkback.core.pages import PAGE_SIZE
from blkback.core.ring import Ring

if TYPE_CHECKING:
    from blkback.sim.engine import EventLoop
    from blkback.sim.host import Host

SEGS_DIRECT = 11
SEGS_PER_INDIRECT_PAGE = 512


@dataclass(slots=True)
class VolumeConfig:
    """A backing volume: sustained bandwidth, latency and an optional initial burst."""

    mbps: float = 38.7  # MB/s (10^6 B/s), the seed's dd rate
    latency_ms: float = 1.0
    burst_mb: float = 0.0
    burst_mbps: float = 400.0


@dataclass(slots=True)
class WorkloadConfig:
    """What the guest does with one disk."""

    kind: str = "bursty"  # "dd", "bursty", "periodic", "random", "idle"
    # dd: the seed's loop of dd if=/dev/zero bs=4k count=131072; sync
    dd_bytes: int = 512 * 2**20
    dd_runs: int = 5
    # bursty writers: bursts of sequential writes at full speed, exponential sizes and gaps
    burst_mean_mb: float = 48.0
    gap_mean_s: float = 4.0
    start_spread_s: float = 4.0
    # periodic (blkback repro's guests): a burst of exactly burst_mean_mb MiB every period_s,
    # the disks staggered evenly over the period; a burst that is late starts at once
    period_s: float = 8.0
    jitter_ms: float = 0.0  # periodic: each burst starts up to this much late (uniform)
    # random I/O: requests at a mean rate (IOPS), 1..random_max_segments pages each
    iops: float = 200.0
    random_max_segments: int = 32
    # dd, bursty, periodic: random I/O as above at this rate as well, during and between the
    # stream's bursts (0: none), so that the ring never idles for long
    background_iops: float = 0.0


@dataclass(slots=True)
class CpuCost:
    """Backend CPU per page: grant map, fresh page allocation, page free."""

    map_ns: int = 400
    alloc_ns: int = 2500
    free_ns: int = 1500


@dataclass(slots=True)
class DiskStats:
    bytes_done: int = 0
    requests: int = 0
    failed_submits: int = 0
    dd_runs: list[tuple[int, int]] = field(default_factory=list)  # (start_ns, end_ns)


class Disk:
    """One ring of one virtual disk: frontend queue, backend ring, volume, workload."""

    __slots__ = (
        "burst_at",
        "busy",
        "cost",
        "cpu_free",
        "dd_done_runs",
        "dd_left",
        "dd_start",
        "ind_per_req",
        "indirect",
        "inflight",
        "label",
        "loop",
        "max_segs",
        "next_arrival",
        "pager",
        "quantum",
        "queue_depth",
        "rand_bits",
        "rand_rate",
        "rand_top",
        "rate_carry",
        "remaining",
        "ring",
        "rng",
        "stats",
        "stream_out",
        "tick_at",
        "vol",
        "vol_burst",
        "vol_burst_ns_per_byte",
        "vol_free",
        "vol_lat",
        "vol_ns_per_byte",
        "wl",
    )

    def __init__(
        self,
        label: str,
        ring: Ring,
        loop: EventLoop,
        rng: random.Random,
        *,
        volume: VolumeConfig,
        workload: WorkloadConfig,
        cost: CpuCost,
        queue_depth: int,
        max_segs: int,
        quantum_ms: float,
    ) -> None:
        self.label = label
        self.ring = ring
        self.loop = loop
        self.rng = rng
        self.vol = volume
        self.wl = workload
        self.cost = cost
        self.queue_depth = queue_depth
        self.max_segs = max_segs
        self.quantum = max(1, int(quantum_ms * NS_PER_MS))
        # (completion ns, pages, bytes, part of the burst / dd stream)
        self.inflight: deque[tuple[int, list[int], int, bool]] = deque()
        self.cpu_free = 0
        self.vol_free = 0
        self.vol_ns_per_byte = NS_PER_S / (volume.mbps * 1e6)
        self.vol_burst_ns_per_byte = NS_PER_S / (volume.burst_mbps * 1e6)
        self.vol_burst = int(volume.burst_mb * 1e6)
        self.vol_lat = int(volume.latency_ms * NS_PER_MS)
        self.stats = DiskStats()
        self.remaining = 0  # bytes the current burst / dd run still has to issue
        self.stream_out = 0  # requests of the current burst / dd run in flight
        self.busy = False
        self.tick_at = -1
        self.rate_carry = 0.0
        self.next_arrival = 0
        self.dd_left = 0
        self.dd_start = 0
        self.dd_done_runs = 0
        self.burst_at = 0  # periodic: when the current burst was due
        self.indirect = True  # False: NBD requests carry no indirect descriptor pages
        self.pager: Host | None = None  # set when pool pages are swappable (faults, drops)
        self.ind_per_req = 0  # indirect pages of a request of more than 11 segments: start()
        self.rand_rate = 0.0  # random I/O, fixed by start(): requests per quantum (mean),
        self.rand_top = 1  # and the size draw: 1..rand_top pages
        self.rand_bits = 1

    # -- workload ---------------------------------------------------------------------------
    def start(self) -> None:
        """Schedule the workload's first activity (``indirect`` and the rest are set)."""
        self.ind_per_req = (
            0
            if self.max_segs <= SEGS_DIRECT or not self.indirect
            else -(-self.max_segs // SEGS_PER_INDIRECT_PAGE)
        )
        kind = self.wl.kind
        if kind == "dd":
            self.loop.at(0, _begin_burst, self)
        elif kind == "bursty":
            self.loop.at(
                int(self.rng.uniform(0, self.wl.start_spread_s) * NS_PER_S), _begin_burst, self
            )
        elif kind == "periodic":
            self.loop.at(self.burst_at + self._jitter(), _begin_burst, self)
        elif kind == "random":
            self._start_random(self.wl.iops)
        elif kind != "idle":
            raise ValueError(f"unknown workload {kind!r}")
        if kind in ("dd", "bursty", "periodic") and self.wl.background_iops > 0:
            self._start_random(self.wl.background_iops)

    def _start_random(self, iops: float) -> None:
        """Fix the random I/O's constants and schedule its first tick."""
        self.rand_rate = iops * self.quantum / NS_PER_S  # requests per quantum (mean)
        top = max(1, min(self.wl.random_max_segments, self.max_segs))
        self.rand_top = top
        self.rand_bits = top.bit_length()
        self.loop.at(int(self.rng.uniform(0, 0.01) * NS_PER_S), Disk.random_tick, self)

    def begin_burst(self, now: int) -> None:
        if self.wl.kind == "dd":
            self.remaining = self.wl.dd_bytes
            self.dd_start = now
        elif self.wl.kind == "periodic":
            self.remaining = int(self.wl.burst_mean_mb * 2**20) // PAGE_SIZE * PAGE_SIZE
        else:
            mean = self.wl.burst_mean_mb * 2**20
            self.remaining = max(
                PAGE_SIZE, int(self.rng.expovariate(1.0 / mean)) // PAGE_SIZE * PAGE_SIZE
            )
        self.busy = True
        self.schedule_tick(now)

    def burst_done(self, now: int) -> None:
        """All of the burst's requests completed."""
        self.busy = False
        if self.wl.kind == "dd":
            self.stats.dd_runs.append((self.dd_start, now))
            self.dd_done_runs += 1
            if self.dd_done_runs < self.wl.dd_runs:
                # sync: one flush request, no data pages, one volume round trip
                self.loop.at(now + self.vol_lat, _begin_burst, self)
        elif self.wl.kind == "periodic":
            period = int(self.wl.period_s * NS_PER_S)
            self.burst_at += period
            if self.burst_at < now:  # fell behind: skip, do not pile up (as guest.py)
                self.burst_at = now + period
            self.loop.at(self.burst_at + self._jitter(), _begin_burst, self)
        else:
            gap = self.rng.expovariate(1.0 / self.wl.gap_mean_s)
            self.loop.at(now + int(gap * NS_PER_S), _begin_burst, self)

    def _jitter(self) -> int:
        j = self.wl.jitter_ms
        return int(self.rng.uniform(0, j) * NS_PER_MS) if j > 0 else 0

    # -- I/O ticks --------------------------------------------------------------------------
    def schedule_tick(self, when: int) -> None:
        if self.tick_at >= 0 and self.tick_at <= when:
            return  # an earlier (or equal) tick is already queued
        self.tick_at = when
        self.loop.at(when, Disk.tick, self)

    def tick(self, now: int) -> None:
        if now != self.tick_at:
            return  # superseded by an earlier tick
        self.tick_at = -1
        ring = self.ring
        inflight = self.inflight
        # 1. completions: pages back to the pool (the end_io callback), no loop pass
        if inflight and inflight[0][0] <= now:
            self._complete(now)
        # 2. the frontend fills free slots; the backend maps them and runs its pass
        submitted = 0
        slots = self.queue_depth - len(inflight)
        if slots > 0 and self.remaining > 0:
            submitted = self._submit_stream(now, slots)
        if submitted:
            pager = self.pager
            if pager is None:
                freed = ring.loop_pass(now)  # had_io
            else:
                freed = pager.pool_pass(ring, now, had_io=True)
            if freed:
                cpu = self.cpu_free
                self.cpu_free = (cpu if cpu > now else now) + freed * self.cost.free_ns
        # 3. next tick
        if self.stream_out:
            nxt = inflight[0][0]
            soon = now + self.quantum
            if self.remaining > 0 and nxt < soon:
                # wait a quantum, or until half the queue has completed if that is sooner
                n = len(inflight)
                half = self.queue_depth // 2
                half = inflight[(n if n < half else half) - 1][0]
                if half < soon:
                    soon = half
                if soon > nxt:
                    nxt = soon
            self.schedule_tick(nxt if nxt > now else now + 1)
        elif self.remaining > 0:
            self.schedule_tick(now + self.quantum)  # allocation failed: back off and retry
        elif self.busy:
            self.burst_done(now)

    def _complete(self, now: int) -> None:
        """Every request whose completion time has come: pages back to the pool.

        The caller has checked that the first one has come.
        """
        inflight = self.inflight
        stream: int  # requests of the stream (True counts 1)
        _t, returned, nbytes, stream = inflight.popleft()
        if inflight and inflight[0][0] <= now:
            returned = list(returned)  # more than one: gather them, one put as ever
            while inflight and inflight[0][0] <= now:
                _t, pages, n, s = inflight.popleft()
                returned += pages
                nbytes += n
                stream += s
        self.ring.put_pages(returned)
        self.stats.bytes_done += nbytes
        if stream:
            self.stream_out -= stream

    def _submit_stream(self, now: int, slots: int) -> int:
        """Submit up to ``slots`` requests of the current stream; return how many went in.

        The requests of one tick are mapped with one ``get_pages`` call (the pool hands out
        pages exactly as one call per request would); if that allocation fails, requests go
        one by one until one fails, as ``xen_blkbk_map`` fails a single request.
        """
        max_bytes = self.max_segs * PAGE_SIZE
        ind_per_req = self.ind_per_req
        remaining = self.remaining
        if slots == 1 or remaining <= max_bytes:  # one request: _map_one, same retry
            nbytes = max_bytes if remaining >= max_bytes else remaining
            try:
                return self._map_one(now, nbytes, True)
            except MemoryError:
                try:
                    return self._map_one(now, nbytes, True)
                except MemoryError:
                    self.stats.failed_submits += 1
                    return 0
        sizes: list[int] = []
        while len(sizes) < slots and remaining > 0:
            nbytes = max_bytes if remaining >= max_bytes else remaining
            sizes.append(nbytes)
            remaining -= nbytes
        try:
            return self._map_batch(now, sizes, ind_per_req)
        except MemoryError:
            n = 0
            for nbytes in sizes:
                try:
                    n += self._map_batch(now, [nbytes], ind_per_req)
                except MemoryError:
                    self.stats.failed_submits += 1
                    break
            return n

    def _map_batch(
        self, now: int, sizes: list[int], ind_per_req: int, *, stream: bool = True
    ) -> int:
        ring = self.ring
        pool = ring.pool
        total = 0
        for nb in sizes:
            segs = -(-nb // PAGE_SIZE)
            total += segs + ind_per_req if segs > SEGS_DIRECT else segs
        misses = pool.misses
        if self.pager is not None:
            self.pager.pool_get(ring, total)  # swapped pool pages fault in first
        pages = ring.get_pages(total, now)  # on MemoryError the pages taken are back in the pool
        cost = self.cost
        map_ns = cost.map_ns
        cpu = self.cpu_free
        if cpu < now:
            cpu = now
        cpu += (pool.misses - misses) * cost.alloc_ns
        vol_free = self.vol_free
        lat = self.vol_lat
        ns_per_byte = self.vol_ns_per_byte
        append = self.inflight.append
        indirect: list[int] = []
        off = 0
        for nbytes in sizes:
            segs = -(-nbytes // PAGE_SIZE)
            end = off + segs
            req = pages[off:end]
            if ind_per_req and segs > SEGS_DIRECT:
                indirect += pages[end : end + ind_per_req]
                off = end + ind_per_req
            else:
                off = end
            cpu += segs * map_ns
            start = cpu if cpu > vol_free else vol_free
            if self.vol_burst > 0:
                self.vol_burst -= nbytes
                vol_free = start + int(nbytes * self.vol_burst_ns_per_byte)
            else:
                vol_free = start + int(nbytes * ns_per_byte)
            append((vol_free + lat, req, nbytes, stream))
        if stream:
            self.remaining -= sum(sizes)
            self.stream_out += len(sizes)
        if indirect:
            ring.put_pages(indirect)  # parsed: the indirect descriptor pages go back at once
        self.cpu_free = cpu
        self.vol_free = vol_free
        self.stats.requests += len(sizes)
        return len(sizes)

    # -- random I/O -------------------------------------------------------------------------
    def random_tick(self, now: int) -> None:
        """Random I/O at a mean rate, sizes uniform in 1..``random_max_segments`` pages.

        Arrivals are counted per quantum (the rate jittered by +-50 %); requests that find
        the queue full wait for the next quantum. The queue's occupancy, and so the pages in
        flight, fluctuates: the pool holds the difference up to ``max_buffer_pages``.

        The draws are those of ``rng.uniform(0.5, 1.5)`` and ``rng.randint(1, top)``, made
        inline: the same calls of ``random()`` and ``getrandbits``, so the same numbers
        (``uniform(a, b)`` is ``a + (b - a) * random()``; ``randint(1, top)`` is ``1 +
        getrandbits(top.bit_length())``, drawn again while ``>= top``, as Python 3.11's).
        """
        inflight = self.inflight
        if inflight and inflight[0][0] <= now:
            self._complete(now)
        rng = self.rng
        carry = self.rate_carry + self.rand_rate * (0.5 + rng.random())
        k = int(carry)
        free = self.queue_depth - len(inflight)
        if k > free:
            k = free
        if k > 0:
            self.rate_carry = carry - k
            top = self.rand_top
            bits = self.rand_bits
            getrandbits = rng.getrandbits
            try:
                if k == 1:
                    r = getrandbits(bits)
                    while r >= top:
                        r = getrandbits(bits)
                    self._map_one(now, (r + 1) * PAGE_SIZE, False)
                else:
                    sizes = []
                    for _ in range(k):
                        r = getrandbits(bits)
                        while r >= top:
                            r = getrandbits(bits)
                        sizes.append((r + 1) * PAGE_SIZE)
                    self._map_batch(now, sizes, self.ind_per_req, stream=False)
            except MemoryError:
                self.stats.failed_submits += 1
            else:
                pager = self.pager
                if pager is None:
                    freed = self.ring.loop_pass(now)  # had_io
                else:
                    freed = pager.pool_pass(self.ring, now, had_io=True)
                if freed:
                    cpu = self.cpu_free
                    self.cpu_free = (cpu if cpu > now else now) + freed * self.cost.free_ns
        else:
            self.rate_carry = carry
        self.loop.after_fixed(self.quantum, _random_tick, self)

    def _map_one(self, now: int, nbytes: int, stream: bool) -> int:
        """``_map_batch(now, [nbytes], self.ind_per_req, stream=stream)``, for one request."""
        ring = self.ring
        pool = ring.pool
        segs = -(-nbytes // PAGE_SIZE)
        total = segs + self.ind_per_req if segs > SEGS_DIRECT else segs
        misses = pool.misses
        if self.pager is not None:
            self.pager.pool_get(ring, total)  # swapped pool pages fault in first
        pages = ring.get_pages(total, now)  # on MemoryError the pages taken are back in the pool
        cost = self.cost
        cpu = self.cpu_free
        if cpu < now:
            cpu = now
        misses = pool.misses - misses
        if misses:
            cpu += misses * cost.alloc_ns
        cpu += segs * cost.map_ns
        vol_free = self.vol_free
        if cpu > vol_free:
            vol_free = cpu
        if self.vol_burst > 0:
            self.vol_burst -= nbytes
            vol_free += int(nbytes * self.vol_burst_ns_per_byte)
        else:
            vol_free += int(nbytes * self.vol_ns_per_byte)
        if total > segs:
            indirect = pages[segs:]
            del pages[segs:]
            self.inflight.append((vol_free + self.vol_lat, pages, nbytes, stream))
            ring.put_pages(indirect)  # parsed: the indirect descriptor pages go back at once
        else:
            self.inflight.append((vol_free + self.vol_lat, pages, nbytes, stream))
        if stream:
            self.remaining -= nbytes
            self.stream_out += 1
        self.cpu_free = cpu
        self.vol_free = vol_free
        self.stats.requests += 1
        return 1

    def drain(self) -> None:
        """Complete everything in flight at once (end of a run): pages back to the pool."""
        while self.inflight:
            _t, pages, _n, _s = self.inflight.popleft()
            self.ring.put_pages(pages)
        self.stream_out = 0

    def in_flight_pages(self) -> int:
        return sum(len(p) for _t, p, _n, _s in self.inflight)


def _begin_burst(disk: Disk, now: int) -> None:
    disk.begin_burst(now)


_random_tick = Disk.random_tick
