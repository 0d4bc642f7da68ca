"""The simulator's fast paths give the same runs as the general code they replace.

Each test runs a host twice: once as it is, once with a fast path swapped for the general (or
the former) code, and compares every result and the whole event trace.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from blkback.clock import NS_PER_S
from blkback.core.pages import PAGE_SIZE
from blkback.sim.guest import SEGS_DIRECT, SEGS_PER_INDIRECT_PAGE, Disk
from blkback.sim.host import HostAllocator
from blkback.sim.scenario import Scenario, SimHost, scenario_from_repro
from blkback.sim.sweep import make_scenario


def reference_random_tick(self: Disk, now: int) -> None:
    """``Disk.random_tick`` before its fast path: ``uniform``, ``randint``, ``_map_batch``."""
    ring = self.ring
    inflight = self.inflight
    if inflight and inflight[0][0] <= now:
        self._complete(now)
    rng = self.rng
    iops = self.wl.iops if self.wl.kind == "random" else self.wl.background_iops
    self.rate_carry += iops * self.quantum / NS_PER_S * rng.uniform(0.5, 1.5)
    k = min(int(self.rate_carry), self.queue_depth - len(inflight))
    if k > 0:
        self.rate_carry -= k
        top = max(1, min(self.wl.random_max_segments, self.max_segs))
        sizes = [rng.randint(1, top) * PAGE_SIZE for _ in range(k)]
        ind = (
            0
            if self.max_segs <= SEGS_DIRECT or not self.indirect
            else -(-self.max_segs // SEGS_PER_INDIRECT_PAGE)
        )
        try:
            n = self._map_batch(now, sizes, ind, stream=False)
        except MemoryError:
            self.stats.failed_submits += 1
            n = 0
        if n:
            pager = self.pager
            if pager is None:
                freed = ring.loop_pass(now, had_io=True)
            else:
                freed = pager.pool_pass(ring, now, had_io=True)
            if freed:
                self.cpu_free = max(self.cpu_free, now) + freed * self.cost.free_ns
    self.loop.at(now + self.quantum, Disk.random_tick, self)


reference_random_tick.__qualname__ = "Disk.random_tick"  # the same trace labels


def reference_submit_stream(self: Disk, now: int, slots: int) -> int:
    """``Disk._submit_stream`` before its one-request fast path: always ``_map_batch``."""
    max_bytes = self.max_segs * PAGE_SIZE
    ind_per_req = self.ind_per_req
    sizes: list[int] = []
    remaining = self.remaining
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


def map_one_by_batch(self: Disk, now: int, nbytes: int, stream: bool) -> int:
    return self._map_batch(now, [nbytes], self.ind_per_req, stream=stream)


def small(
    variant: str = "after", *, seed: int = 5, seconds: float = 3.0, **point: object
) -> Scenario:
    sc = make_scenario(
        {"variant": variant, "duration": 10, "devices": 30, "memory": 700, **point},
        seed=seed,
        sim_seconds=seconds,
    )
    sc.trace = True
    return sc


def failing() -> Scenario:
    """Allocations fail: nothing to swap to (requests back off and retry)."""
    sc = small("before", seed=7, seconds=4.0)
    sc.host.swap_mib = 1
    return sc


def swappable() -> Scenario:
    """``blkback repro``'s dom0 (pool pages swap out and fault in) with random I/O as well."""
    mib = 2**20
    sizing = {
        "devices": 6,
        "burst": 8 * mib,
        "request": 4 * mib,
        "period_s": 2.0,
        "hog_mib": 32,
        "slack_mib": 16,
        "seconds": 4.0,
    }
    doc = {
        "sizing": sizing,
        "configurations": {"off": {"params": {"buffer_squeeze_duration_ms": 0}}},
        "swap": {"swaps": [{"size_kib": str(512 * 1024)}]},
    }
    sc = scenario_from_repro(doc, "off", seed=5)
    sc.guests.workload.background_iops = 200.0
    sc.trace = True
    return sc


def nbd() -> Scenario:
    """NBD requests: up to 64 pages, no indirect descriptor pages."""
    sc = small("after")
    sc.guests.nbd = True
    sc.guests.max_indirect_segments = 64
    return sc


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "after": small,
    "wake": lambda: small("wake"),
    "random": lambda: small("after", workload="random"),
    "failing": failing,
    "swappable": swappable,
    "nbd": nbd,
}


def run(sc: Scenario) -> tuple[dict[str, object], list[tuple[int, str, str]]]:
    sim = SimHost(sc)
    result = sim.run()
    sim.check()
    assert sim.loop.trace is not None
    return result, sim.loop.trace


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fast_paths_give_the_reference_run(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = run(SCENARIOS[name]())
    with monkeypatch.context() as m:
        m.setattr(Disk, "random_tick", reference_random_tick)
        m.setattr(Disk, "_submit_stream", reference_submit_stream)
        m.setattr(Disk, "_map_one", map_one_by_batch)
        m.setattr(HostAllocator, "alloc_many", None)  # the pool allocates page by page
        ref = run(SCENARIOS[name]())
    assert fast[0] == ref[0]
    assert fast[1] == ref[1]
    assert fast[0]["requests"]


def test_the_scenarios_reach_the_paths_they_are_for() -> None:
    failed = SimHost(failing()).run()
    assert failed["alloc_failures"] and failed["failed_submits"]
    swapped = SimHost(swappable()).run()
    assert swapped["pswpin"] and swapped["pswpout"]  # pool pages swapped out and faulted in


@pytest.mark.parametrize("top", [1, 2, 3, 11, 32, 33, 100])
def test_inline_size_draws_are_randints(top: int) -> None:
    """The draw ``random_tick`` makes inline is ``randint(1, top)``'s, number for number."""
    import random

    a, b = random.Random(3), random.Random(3)
    bits = top.bit_length()
    for _ in range(500):
        r = a.getrandbits(bits)
        while r >= top:
            r = a.getrandbits(bits)
        assert r + 1 == b.randint(1, top)
        assert 0.5 + a.random() == b.uniform(0.5, 1.5)
