"""The idle ring that rests: no timed pass while nothing can change its pool (Ring.at_rest)."""

from __future__ import annotations

import random

import pytest

from blkback.clock import NS_PER_MS, ManualClock
from blkback.core.counting import CountingAllocator
from blkback.core.device import Bus
from blkback.core.params import Params
from blkback.core.policy import PressureLevel
from blkback.core.ring import Ring


def _ring(params: Params, clock: ManualClock, pages: int = 0) -> Ring:
    bus = Bus(params)
    ring = bus.add_device("d").add_ring(CountingAllocator(), clock.now_ns())
    if pages:
        ring.put_pages(ring.get_pages(pages, clock.now_ns()))
        ring.loop_pass(clock.now_ns())
    return ring


def test_a_ring_at_its_target_with_no_squeeze_pending_is_at_rest() -> None:
    clock = ManualClock(NS_PER_MS)
    ring = _ring(Params(max_buffer_pages=16), clock, pages=10)
    assert ring.at_rest(clock.now_ns())


def test_a_ring_above_its_target_is_not_at_rest() -> None:
    clock = ManualClock(NS_PER_MS)
    params = Params(max_buffer_pages=16)
    ring = _ring(params, clock, pages=10)
    params.set("max_buffer_pages", 4)
    assert not ring.at_rest(clock.now_ns())
    ring.loop_pass(clock.now_ns(), had_io=False)
    assert ring.at_rest(clock.now_ns())


def test_a_ring_with_pages_in_flight_is_not_at_rest() -> None:
    clock = ManualClock(NS_PER_MS)
    ring = _ring(Params(), clock)
    pages = ring.get_pages(3, clock.now_ns())
    assert not ring.at_rest(clock.now_ns())  # a worker may put them back above the target
    ring.put_pages(pages)
    assert ring.at_rest(clock.now_ns())


def test_a_pending_squeeze_keeps_the_timed_pass_until_its_window_ends() -> None:
    clock = ManualClock(NS_PER_MS)
    ring = _ring(Params(), clock)
    ring.device.bus.reclaim_memory(clock.now_ns())
    assert not ring.at_rest(clock.now_ns())
    clock.advance_ms(10)
    assert ring.at_rest(clock.now_ns())


@pytest.mark.parametrize(("name", "value"), [("squeeze_wake", 0), ("log_stats", 1)])
def test_lazy_squeeze_and_log_stats_keep_the_timed_pass(name: str, value: int) -> None:
    clock = ManualClock(NS_PER_MS)
    params = Params()
    ring = _ring(params, clock)
    params.set(name, value)
    assert not ring.at_rest(clock.now_ns())


class _Runner:
    """One ring as the server drives it: timed passes always, or only when not at rest."""

    def __init__(self, policy: str, clock: ManualClock, *, rests: bool) -> None:
        self.params = Params(
            max_buffer_pages=64, buffer_squeeze_duration_ms=2000, squeeze_policy=policy
        )
        self.clock = clock
        self.ring = _ring(self.params, clock)
        self.rests = rests

    def io(self, n: int) -> None:
        now = self.clock.now_ns()
        self.ring.put_pages(self.ring.get_pages(n, now))
        self.ring.loop_pass(now)

    def set_max(self, value: int) -> None:
        self.params.set("max_buffer_pages", value)
        if self.rests:  # the server nudges a resting ring, which passes at once
            self.ring.loop_pass(self.clock.now_ns(), had_io=False)

    def pressure(self, level: PressureLevel) -> None:
        now = self.clock.now_ns()
        self.ring.device.bus.reclaim_memory(now, level)
        self.ring.loop_pass(now, had_io=False, woken=True)  # squeeze_wake: the waker's pass

    def tick(self) -> bool:
        """The ring's receive timed out (or would have): a timed pass if one is needed."""
        now = self.clock.now_ns()
        if not self.ring.pass_due(now):
            return False
        if self.rests and self.ring.at_rest(now):
            return False
        self.ring.loop_pass(now, had_io=False)
        return True


@pytest.mark.parametrize("policy", ["kernel", "graded"])
@pytest.mark.parametrize("seed", range(6))
def test_a_resting_ring_has_the_pool_of_a_ring_woken_every_interval(policy: str, seed: int) -> None:
    rng = random.Random(seed)
    clock = ManualClock(NS_PER_MS)
    timed = _Runner(policy, clock, rests=False)
    resting = _Runner(policy, clock, rests=True)
    both = (timed, resting)
    compared = resting_passes = 0
    for _ in range(3000):  # 30 s in 10 ms steps
        clock.advance_ms(10)
        event = rng.random()
        if event < 0.05:
            n = rng.choice([1, 16, 256])
            for r in both:
                r.io(n)
        elif event < 0.06:
            value = rng.choice([0, 8, 64, 200])
            for r in both:
                r.set_max(value)
        elif event < 0.0615:
            level = rng.choice(list(PressureLevel))
            for r in both:
                r.pressure(level)
        ran = timed.tick()
        resting_passes += resting.tick()
        if ran:
            # After every pass of the kernel's timing, the resting ring's pool is the same.
            assert len(resting.ring.pool) == len(timed.ring.pool), clock.now_ns()
            compared += 1
    assert compared > 100
    # ...and it got there with far fewer wake-ups.
    assert resting_passes * 2 < compared
