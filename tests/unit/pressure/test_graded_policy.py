"""GradedPolicy: the response grows with the level and spares active rings (ManualClock)."""

from __future__ import annotations

import pytest

from blkback.clock import NS_PER_MS, NS_PER_S, ManualClock
from blkback.core.counting import CountingAllocator
from blkback.core.device import Bus, Device
from blkback.core.params import Params
from blkback.core.policy import POLICIES, GradedPolicy, PressureLevel
from blkback.core.ring import Ring

M = 64  # max_buffer_pages in these tests


def setup(**params: object) -> tuple[ManualClock, Bus, Device, Ring, Ring]:
    """A device with an idle and an active ring, both pools full (M pages)."""
    clock = ManualClock(10 * NS_PER_S)
    bus = Bus(Params(squeeze_policy="graded", max_buffer_pages=M, **params))
    device = bus.add_device("d0")
    idle = device.add_ring(CountingAllocator(), clock.now_ns())
    active = device.add_ring(CountingAllocator(), clock.now_ns())
    for ring in (idle, active):
        ring.put_pages(ring.get_pages(M, clock.now_ns()))
        ring.loop_pass(clock.now_ns())
    clock.advance_ns(2 * NS_PER_S)  # both idle by now...
    active.loop_pass(clock.now_ns(), had_io=True)  # ...but this one just served I/O
    return clock, bus, device, idle, active


def passes(clock: ManualClock, *rings: Ring, io: Ring | None = None) -> list[int]:
    now = clock.now_ns()
    for ring in rings:
        ring.loop_pass(now, had_io=ring is io)
    return [len(r.pool) for r in rings]


def test_registered() -> None:
    assert isinstance(POLICIES["graded"], GradedPolicy)
    assert Bus(Params(squeeze_policy="graded")).policy.name == "graded"


@pytest.mark.parametrize(
    ("level", "idle_target", "active_target"),
    [
        (PressureLevel.LOW, M // 2, M),
        (PressureLevel.MEDIUM, 0, M // 2),
        (PressureLevel.CRITICAL, 0, 0),
    ],
)
def test_targets_by_level(level: PressureLevel, idle_target: int, active_target: int) -> None:
    clock, bus, device, idle, active = setup()
    bus.reclaim_memory(clock.now_ns(), level)
    assert device.squeeze_level == level
    clock.advance_ms(1)
    assert passes(clock, idle, active, io=active) == [idle_target, active_target]


def test_window_expires_and_pools_regrow_to_max() -> None:
    clock, bus, _device, idle, active = setup()
    bus.reclaim_memory(clock.now_ns(), PressureLevel.CRITICAL)
    assert passes(clock, idle, active) == [0, 0]
    clock.advance_ms(10)  # exactly the deadline: strict comparison, no longer squeezed
    assert idle.target(clock.now_ns()) == M
    assert active.target(clock.now_ns()) == M


def test_lower_report_does_not_shorten_a_higher_one() -> None:
    clock, bus, device, idle, _active = setup(buffer_squeeze_duration_ms=100)
    bus.reclaim_memory(clock.now_ns(), PressureLevel.CRITICAL)
    clock.advance_ms(50)
    bus.reclaim_memory(clock.now_ns(), PressureLevel.LOW)
    assert device.squeeze_level == PressureLevel.CRITICAL
    clock.advance_ms(49)
    assert idle.target(clock.now_ns()) == 0  # critical still in force
    clock.advance_ms(1)
    assert idle.target(clock.now_ns()) == M // 2  # critical over, low (until 150 ms) left
    clock.advance_ms(50)
    assert idle.target(clock.now_ns()) == M


def test_zero_duration_disables() -> None:
    clock, bus, device, idle, active = setup(buffer_squeeze_duration_ms=0)
    bus.reclaim_memory(clock.now_ns(), PressureLevel.CRITICAL)
    assert not device.squeezed(clock.now_ns())
    assert passes(clock, idle, active) == [M, M]
    assert device.squeezes == 0


def test_idleness_threshold_is_one_second() -> None:
    clock, bus, _device, idle, active = setup(buffer_squeeze_duration_ms=5000)
    bus.reclaim_memory(clock.now_ns(), PressureLevel.MEDIUM)
    clock.advance_ms(999)
    assert active.target(clock.now_ns()) == M // 2
    clock.advance_ms(1)
    assert active.target(clock.now_ns()) == 0
    assert idle.target(clock.now_ns()) == 0


def test_counters_and_wake_as_kernel_policy() -> None:
    clock, bus, device, idle, active = setup()
    bus.reclaim_memory(clock.now_ns(), PressureLevel.MEDIUM)
    assert device.reclaims == 1
    assert device.squeezes == 1
    assert idle.wake_pending
    assert active.wake_pending
    assert device.squeeze_end_ns == clock.now_ns() + 10 * NS_PER_MS
    passes(clock, idle)
    assert idle.stats.pages_squeezed == M


def test_global_scope_shares_one_set_of_deadlines() -> None:
    clock = ManualClock(NS_PER_S)
    bus = Bus(Params(squeeze_policy="graded", squeeze_scope="global", max_buffer_pages=M))
    a = bus.add_device("a")
    b = bus.add_device("b")
    ra = a.add_ring(CountingAllocator(), 0)
    rb = b.add_ring(CountingAllocator(), 0)
    a.reclaim_memory(clock.now_ns(), PressureLevel.CRITICAL)
    assert ra.target(clock.now_ns()) == 0
    assert rb.target(clock.now_ns()) == 0
    assert b.squeezed(clock.now_ns())


def test_devices_are_independent_in_device_scope() -> None:
    clock = ManualClock(NS_PER_S)
    bus = Bus(Params(squeeze_policy="graded", max_buffer_pages=M))
    a = bus.add_device("a")
    b = bus.add_device("b")
    ra = a.add_ring(CountingAllocator(), 0)
    rb = b.add_ring(CountingAllocator(), 0)
    a.reclaim_memory(clock.now_ns(), PressureLevel.CRITICAL)
    assert ra.target(clock.now_ns()) == 0
    assert rb.target(clock.now_ns()) == M


def test_duration_zero_squeezes_no_pass_evaluated_before_the_report() -> None:
    clock, bus, device, idle, active = setup(buffer_squeeze_duration_ms=0)
    stale = clock.now_ns()
    clock.advance_ms(0.05)
    for level in (PressureLevel.LOW, PressureLevel.CRITICAL):
        bus.reclaim_memory(clock.now_ns(), level)
    for ring in (idle, active):
        ring.loop_pass(stale, had_io=False)
    assert [len(idle.pool), len(active.pool)] == [M, M]
    assert device.squeezes == 0
