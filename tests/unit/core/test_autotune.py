"""The auto policy's control law (core/autotune.py) on a manual clock, alone and in a device."""

from __future__ import annotations

from blkback.clock import NS_PER_MS, NS_PER_S, ManualClock
from blkback.core.autotune import FLOOR_NS, HELD_WEIGHT, RETURN_WINDOWS, AutoState, PoolFacts
from blkback.core.counting import CountingAllocator
from blkback.core.device import Bus
from blkback.core.params import Params
from blkback.core.policy import PressureLevel

CEILING = NS_PER_S


class Law:
    """The law driven as a device drives it: each window opens at ``now + duration``."""

    def __init__(self, clock: ManualClock, start_ms: int = 10, ceiling_ns: int = CEILING) -> None:
        self.clock = clock
        self.ceiling_ns = ceiling_ns
        self.state = AutoState.starting(start_ms * NS_PER_MS, ceiling_ns)
        self.end_ns = 0

    def report(self, held: int = 0, squeezed_allocs: int = 0) -> AutoState:
        now = self.clock.now_ns()
        facts = PoolFacts(held, squeezed_allocs)
        self.state = self.state.after_report(now, self.end_ns, facts, self.ceiling_ns)
        self.end_ns = now + self.state.duration_ns
        return self.state


def test_refill_then_pressure_lengthens() -> None:
    clock = ManualClock(NS_PER_S)
    law = Law(clock)
    assert law.report().duration_ns == 10 * NS_PER_MS  # the first window: the configured 10 ms
    clock.advance_ms(10 + 4)  # closed 4 ms ago; the pools took 300 pages back, then pressure
    state = law.report(held=300, squeezed_allocs=0)
    assert state.verdict == "lengthen"
    assert state.duration_ns == 20 * NS_PER_MS
    assert law.end_ns == clock.now_ns() + 20 * NS_PER_MS
    assert state.lengthened == 1 and "300 pages back" in state.reason


def test_wasted_reclaim_shortens() -> None:
    clock = ManualClock(NS_PER_S)
    law = Law(clock)
    law.report(squeezed_allocs=1_000)
    clock.advance_ms(500)  # the window's tail allocated 64 pages, no pressure for 490 ms
    state = law.report(held=800, squeezed_allocs=1_064)
    assert state.verdict == "shorten"
    assert state.duration_ns == 5 * NS_PER_MS
    assert state.shortened == 1 and "64 pages" in state.reason


def test_a_tail_that_wasted_more_than_the_held_pages_are_worth_shortens_on_an_early_return() -> (
    None
):
    clock = ManualClock(NS_PER_S)
    law = Law(clock, start_ms=100)
    law.report(squeezed_allocs=0)
    clock.advance_ms(100 + 30)  # pressure back 30 ms after a 100 ms window, whose tail took
    allocs = HELD_WEIGHT * 50  # as many pages as 50 held pages are worth: not less
    state = law.report(held=50, squeezed_allocs=allocs)
    assert state.verdict == "shorten"
    assert state.duration_ns == 50 * NS_PER_MS
    clock.set_ns(law.end_ns + NS_PER_MS)  # the same with one page less under the tail
    state = law.report(held=50, squeezed_allocs=allocs + HELD_WEIGHT * 50 - 1)
    assert state.verdict == "lengthen"
    assert state.duration_ns == 100 * NS_PER_MS


def test_a_late_return_does_not_lengthen() -> None:
    clock = ManualClock(NS_PER_S)
    law = Law(clock)
    law.report()
    clock.advance_ms(10 + RETURN_WINDOWS * 10 + 1)  # beyond RETURN_WINDOWS window lengths
    state = law.report(held=300)
    assert state.verdict == "keep"  # and no tail allocations: the window cost nothing
    assert state.duration_ns == 10 * NS_PER_MS


def test_reports_inside_the_window_extend_it_without_judging() -> None:
    clock = ManualClock(NS_PER_S)
    law = Law(clock)
    law.report(squeezed_allocs=0)
    for _ in range(5):
        clock.advance_ms(6)
        state = law.report(held=0, squeezed_allocs=100)
        assert state.duration_ns == 10 * NS_PER_MS
        assert law.end_ns == clock.now_ns() + 10 * NS_PER_MS
    assert state.lengthened == state.shortened == 0
    clock.advance_ms(60)  # the tail counts only what came after the last report: nothing
    assert law.report(squeezed_allocs=100).verdict == "keep"


def test_bounds_hold_both_ways() -> None:
    clock = ManualClock(NS_PER_S)
    law = Law(clock, start_ms=10, ceiling_ns=100 * NS_PER_MS)
    law.report()
    for _ in range(10):  # early returns to refilled pools, again and again
        clock.set_ns(law.end_ns + NS_PER_MS)
        law.report(held=1_000)
    assert law.state.duration_ns == 100 * NS_PER_MS
    assert law.state.lengthened == 10
    allocs = 0
    for _ in range(20):  # quiet tails that wasted pages, again and again
        allocs += 10
        law.report(squeezed_allocs=allocs)
        clock.set_ns(law.end_ns + NS_PER_S)
    assert law.state.duration_ns == FLOOR_NS
    assert AutoState.starting(10 * NS_PER_S, 50 * NS_PER_MS).duration_ns == 50 * NS_PER_MS
    assert AutoState.starting(0, CEILING).duration_ns == FLOOR_NS


def _device_with_pages(params: Params, pages: int, clock: ManualClock):  # type: ignore[no-untyped-def]
    bus = Bus(params)
    dev = bus.add_device("d")
    ring = dev.add_ring(CountingAllocator(), clock.now_ns())
    ring.put_pages(ring.get_pages(pages, clock.now_ns()))
    return bus, dev, ring


def test_auto_in_a_device_lengthens_then_shortens_and_shows_its_state() -> None:
    clock = ManualClock(NS_PER_S)
    params = Params(squeeze_policy="auto", max_buffer_pages=64)
    bus, dev, ring = _device_with_pages(params, 64, clock)
    assert dev.snapshot(clock.now_ns())["auto"] is None  # no pressure: no state, no cost
    bus.reclaim_memory(clock.now_ns(), PressureLevel.MEDIUM)
    assert dev.squeeze_end_ns == clock.now_ns() + 10 * NS_PER_MS
    assert ring.loop_pass(clock.now_ns(), had_io=False) == 64  # squeezed to 0
    clock.advance_ms(12)  # the window closed; the ring refills its pool...
    ring.put_pages(ring.get_pages(40, clock.now_ns()))
    assert ring.stats.squeezed_alloc_pages == 0  # allocated after the window: not counted
    ring.loop_pass(clock.now_ns())
    clock.advance_ms(1)  # ...and pressure returns
    bus.reclaim_memory(clock.now_ns())
    auto = dev.snapshot(clock.now_ns())["auto"]
    assert isinstance(auto, dict)
    assert auto["duration_ms"] == 20 and auto["verdict"] == "lengthen"
    assert dev.squeeze_end_ns == clock.now_ns() + 20 * NS_PER_MS
    ring.loop_pass(clock.now_ns(), had_io=False)
    clock.advance_ms(15)  # in the window's quiet tail the ring serves I/O from fresh pages
    ring.put_pages(ring.get_pages(8, clock.now_ns()))
    assert ring.stats.squeezed_alloc_pages == 8
    clock.advance_ms(2_000)
    bus.reclaim_memory(clock.now_ns())
    auto = dev.snapshot(clock.now_ns())["auto"]
    assert isinstance(auto, dict)
    assert auto["duration_ms"] == 10 and auto["verdict"] == "shorten"


def test_switching_policies_keeps_autos_state_and_the_kernel_ignores_it() -> None:
    clock = ManualClock(NS_PER_S)
    params = Params(squeeze_policy="auto", buffer_squeeze_duration_ms=40)
    bus, dev, _ring = _device_with_pages(params, 8, clock)
    bus.reclaim_memory(clock.now_ns())
    params.set("squeeze_policy", "kernel")
    clock.advance_ms(100)
    bus.reclaim_memory(clock.now_ns())
    assert dev.squeeze_end_ns == clock.now_ns() + 40 * NS_PER_MS  # the kernel's fixed duration
    assert dev.squeeze.auto is not None and dev.squeeze.auto.duration_ns == 40 * NS_PER_MS


def test_the_ceiling_parameter_bounds_auto_at_runtime() -> None:
    clock = ManualClock(NS_PER_S)
    params = Params(squeeze_policy="auto", buffer_squeeze_duration_ms=500)
    bus, dev, _ring = _device_with_pages(params, 8, clock)
    params.set("squeeze_ceiling_ms", 30)
    bus.reclaim_memory(clock.now_ns())
    assert dev.squeeze_end_ns == clock.now_ns() + 30 * NS_PER_MS
