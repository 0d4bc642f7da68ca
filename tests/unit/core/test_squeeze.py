"""Rings, devices and the squeeze, against the kernel's semantics (blkback-spec §2, §3, §6)."""

from __future__ import annotations

from blkback.clock import NS_PER_MS, ManualClock
from blkback.core.counting import CountingAllocator
from blkback.core.device import Bus
from blkback.core.params import Params
from blkback.core.policy import PressureLevel


def _ring_with_pool(bus: Bus, name: str, pages: int, clock: ManualClock):  # type: ignore[no-untyped-def]
    dev = bus.devices.get(name) or bus.add_device(name)
    ring = dev.add_ring(CountingAllocator(), clock.now_ns())
    ring.put_pages(ring.get_pages(pages, clock.now_ns()))
    return dev, ring


def test_pass_trims_to_max_buffer_pages() -> None:
    clock = ManualClock(1)
    bus = Bus(Params(max_buffer_pages=16))
    _, ring = _ring_with_pool(bus, "d", 50, clock)
    assert len(ring.pool) == 50  # put has no cap
    assert ring.loop_pass(clock.now_ns()) == 34
    assert len(ring.pool) == 16
    assert ring.stats.pages_trimmed == 34
    assert ring.stats.pages_squeezed == 0


def test_reclaim_squeezes_to_zero_for_the_duration_only() -> None:
    clock = ManualClock(1_000 * NS_PER_MS)
    bus = Bus(Params(max_buffer_pages=16, squeeze_wake=False))
    dev, ring = _ring_with_pool(bus, "d", 16, clock)
    bus.reclaim_memory(clock.now_ns())
    assert dev.squeeze_end_ns == clock.now_ns() + 10 * NS_PER_MS
    clock.advance_ms(9.999)
    assert ring.loop_pass(clock.now_ns(), had_io=False) == 16
    assert ring.stats.pages_squeezed == 16
    ring.put_pages(ring.get_pages(20, clock.now_ns()))
    assert ring.stats.refill_after_squeeze_pages == 20  # reallocated within 1 s: wasted
    clock.advance_ms(0.001)  # now == end: time_before is strict, the window is over
    assert ring.loop_pass(clock.now_ns()) == 4
    assert len(ring.pool) == 16


def test_duration_zero_never_squeezes() -> None:
    clock = ManualClock(5)
    bus = Bus(Params(buffer_squeeze_duration_ms=0))
    dev, ring = _ring_with_pool(bus, "d", 8, clock)
    bus.reclaim_memory(clock.now_ns())
    assert not dev.squeezed(clock.now_ns())
    assert ring.loop_pass(clock.now_ns()) == 0
    assert len(ring.pool) == 8
    assert dev.squeezes == 0


def test_duration_zero_does_not_squeeze_a_pass_evaluated_just_before_the_report() -> None:
    # A ring thread reads the clock, then a report lands before its pass runs (the race that
    # made repro's "squeeze off" configuration free 1,024 pages with 0 squeezes).
    clock = ManualClock(1_000 * NS_PER_MS)
    bus = Bus(Params(max_buffer_pages=16, buffer_squeeze_duration_ms=0))
    dev, ring = _ring_with_pool(bus, "d", 16, clock)
    stale = clock.now_ns()
    clock.advance_ms(0.05)
    bus.reclaim_memory(clock.now_ns())
    bus.reclaim_memory(clock.now_ns())  # and a second one
    assert not dev.squeezed(stale)
    assert ring.loop_pass(stale) == 0
    assert len(ring.pool) == 16
    assert ring.stats.pages_squeezed == 0 and dev.squeezes == 0


def test_duration_lowered_to_zero_ends_an_open_window_at_the_report() -> None:
    clock = ManualClock(0)
    params = Params()
    bus = Bus(params)
    dev, _ = _ring_with_pool(bus, "d", 1, clock)
    bus.reclaim_memory(clock.now_ns())  # window [0, 10 ms)
    clock.advance_ms(4)
    params.set("buffer_squeeze_duration_ms", 0)
    bus.reclaim_memory(clock.now_ns())
    assert dev.squeeze_end_ns == 4 * NS_PER_MS  # plain store: the window ends now
    assert dev.squeezed(4 * NS_PER_MS - 1) and not dev.squeezed(4 * NS_PER_MS)


def test_repeated_pressure_extends_and_can_shorten_the_window() -> None:
    clock = ManualClock(0)
    params = Params()
    bus = Bus(params)
    dev, _ = _ring_with_pool(bus, "d", 1, clock)
    bus.reclaim_memory(clock.now_ns())
    clock.advance_ms(8)
    bus.reclaim_memory(clock.now_ns())
    assert dev.squeeze_end_ns == 18 * NS_PER_MS  # now + d, not max(old, new)
    params.set("buffer_squeeze_duration_ms", 1)
    bus.reclaim_memory(clock.now_ns())
    assert dev.squeeze_end_ns == 9 * NS_PER_MS  # a plain store: the deadline moved earlier
    assert dev.squeezes == 1  # one window, extended


def test_device_scope_vs_global_scope() -> None:
    clock = ManualClock(0)
    bus = Bus(Params(squeeze_scope="device"))
    a, _ = _ring_with_pool(bus, "a", 1, clock)
    b, _ = _ring_with_pool(bus, "b", 1, clock)
    a.reclaim_memory(clock.now_ns())
    assert a.squeezed(0)
    assert not b.squeezed(0)
    gbus = Bus(Params(squeeze_scope="global"))
    ga, _ = _ring_with_pool(gbus, "a", 1, clock)
    gb, _ = _ring_with_pool(gbus, "b", 1, clock)
    ga.reclaim_memory(clock.now_ns())
    assert ga.squeezed(0)
    assert gb.squeezed(0)
    assert gbus.global_squeeze.end_ns == 10 * NS_PER_MS


def test_lazy_mode_misses_an_idle_ring_and_wake_mode_catches_it() -> None:
    """Kernel inference (spec §6.3): a 10 ms window between two 100 ms idle passes is missed."""
    for wake in (False, True):
        clock = ManualClock(0)
        bus = Bus(Params(squeeze_wake=wake))
        dev, ring = _ring_with_pool(bus, "d", 64, clock)
        ring.loop_pass(clock.now_ns(), had_io=True)
        woken: list[int] = []
        ring.waker = lambda r=ring, w=woken: w.append(r.ring_id)
        clock.advance_ms(30)
        bus.reclaim_memory(clock.now_ns(), PressureLevel.MEDIUM)
        if ring.wake_pending:  # the runner's reaction to a wake: a pass at once
            ring.loop_pass(clock.now_ns(), had_io=False, woken=True)
        clock.advance_ms(70)  # the idle ring's next regular pass, after the window closed
        assert ring.pass_due(clock.now_ns()) is (not wake)
        if ring.pass_due(clock.now_ns()):
            ring.loop_pass(clock.now_ns(), had_io=False)
        if wake:
            assert woken == [0]
            assert len(ring.pool) == 0
            assert ring.stats.woken_passes == 1
        else:
            assert woken == []
            assert len(ring.pool) == 64  # the squeeze was missed entirely
            assert dev.squeezes == 1


def test_remove_ring_frees_everything_and_keeps_totals() -> None:
    clock = ManualClock(0)
    bus = Bus()
    dev, ring = _ring_with_pool(bus, "d", 30, clock)
    alloc = ring.pool.allocator
    assert dev.remove_ring(ring) == 30
    assert alloc.live_pages == 0
    assert bus.retired == {
        "rings": 1,
        "pages_allocated": 30,
        "pages_freed": 30,
        "pages_reclaimed": 0,
    }
    bus.remove_device("d")
    assert bus.devices == {}


def test_log_stats_line_every_ten_seconds() -> None:
    clock = ManualClock(0)
    bus = Bus(Params(log_stats=True))
    lines: list[str] = []
    bus.stats_sink = lines.append
    _, ring = _ring_with_pool(bus, "vol", 3, clock)
    ring.stats.rd_req += 5
    ring.stats.f_req += 2
    ring.loop_pass(clock.now_ns())
    assert lines == []
    clock.advance_ms(10_000)
    ring.loop_pass(clock.now_ns())
    assert len(lines) == 1
    assert "vol/0" in lines[0]
    assert "rd    5" in lines[0]
    assert "f    2" in lines[0]
    ring.stats.rd_req += 1
    clock.advance_ms(10_000)
    ring.loop_pass(clock.now_ns())
    assert "rd    1" in lines[1]
    assert "f    2" in lines[1]


def test_snapshot_shape() -> None:
    clock = ManualClock(0)
    bus = Bus()
    dev, _ring = _ring_with_pool(bus, "d", 2, clock)
    snap = dev.snapshot(clock.now_ns())
    assert snap["name"] == "d"
    assert snap["squeeze_end_ms"] is None
    (r,) = snap["rings"]  # type: ignore[misc]
    assert r["pool_pages"] == 2
    assert r["in_flight_pages"] == 0
    assert r["pages_allocated"] == 2


def test_woken_passes_are_evaluated_at_the_wake_instant() -> None:
    """A runner waking 64 rings one by one must not let the window close on the later ones."""
    clock = ManualClock(0)
    bus = Bus(Params(squeeze_wake=True))
    rings = [_ring_with_pool(bus, f"d{i}", 100, clock)[1] for i in range(64)]
    for r in rings:
        r.loop_pass(clock.now_ns())

    def slow_runner(ring):  # type: ignore[no-untyped-def]
        def wake() -> None:
            clock.advance_ms(1)  # each pass takes 1 ms of real time...
            assert ring.wake_ns is not None
            ring.loop_pass(ring.wake_ns, had_io=False, woken=True)  # ...but runs "at" the wake

        return wake

    for r in rings:
        r.waker = slow_runner(r)
    report_at = clock.now_ns()
    bus.reclaim_memory(report_at)
    assert clock.now_ns() - report_at == 64 * NS_PER_MS  # far past the 10 ms window
    assert [len(r.pool) for r in rings] == [0] * 64
    assert all(r.wake_ns is None and r.last_pass_ns == report_at for r in rings)
