"""Squeeze policies are pure: a report returns a decision, the device stores it (ManualClock)."""

from __future__ import annotations

from blkback.clock import NS_PER_MS, NS_PER_S, ManualClock
from blkback.core.autotune import NO_FACTS
from blkback.core.counting import CountingAllocator
from blkback.core.device import Bus
from blkback.core.params import Params
from blkback.core.policy import (
    NO_SQUEEZE,
    GradedPolicy,
    KernelPolicy,
    PressureLevel,
    SqueezeDecision,
)

M = 64  # max_buffer_pages in these tests


def test_kernel_decision_is_a_new_value_and_the_old_one_stays() -> None:
    params = Params(buffer_squeeze_duration_ms=10)
    decided = KernelPolicy().decide(NO_SQUEEZE, PressureLevel.LOW, 5 * NS_PER_MS, params, NO_FACTS)
    assert decided == SqueezeDecision(15 * NS_PER_MS, PressureLevel.LOW, (0, 0, 0))
    assert SqueezeDecision() == NO_SQUEEZE  # the decision in force was not written into
    again = KernelPolicy().decide(decided, PressureLevel.CRITICAL, 9 * NS_PER_MS, params, NO_FACTS)
    assert again.end_ns == 19 * NS_PER_MS  # a plain store: now + d
    assert decided.end_ns == 15 * NS_PER_MS


def test_graded_decision_keeps_a_deadline_per_level() -> None:
    params = Params(buffer_squeeze_duration_ms=100)
    graded = GradedPolicy()
    low = graded.decide(NO_SQUEEZE, PressureLevel.LOW, 0, params, NO_FACTS)
    critical = graded.decide(low, PressureLevel.CRITICAL, 50 * NS_PER_MS, params, NO_FACTS)
    assert critical.level_ends_ns == (100 * NS_PER_MS, 0, 150 * NS_PER_MS)
    assert critical.end_ns == 150 * NS_PER_MS
    assert critical.level == PressureLevel.CRITICAL
    assert critical.level_at(149 * NS_PER_MS) == PressureLevel.CRITICAL
    assert critical.level_at(150 * NS_PER_MS) is None  # the low deadline passed at 100 ms
    assert low.level_ends_ns == (100 * NS_PER_MS, 0, 0)


def test_targets_come_from_the_decision_and_the_ring_alone() -> None:
    params = Params(max_buffer_pages=M)
    graded = GradedPolicy(idle_ns=NS_PER_S)
    medium = SqueezeDecision(10 * NS_PER_S, PressureLevel.MEDIUM, (0, 10 * NS_PER_S, 0))
    now = 5 * NS_PER_S
    assert graded.target(medium, now, last_io_ns=now, params=params) == M // 2  # active
    assert graded.target(medium, now, last_io_ns=now - NS_PER_S, params=params) == 0  # idle
    assert KernelPolicy().target(medium, now, last_io_ns=now, params=params) == 0
    assert KernelPolicy().target(medium, 10 * NS_PER_S, last_io_ns=now, params=params) == M


def test_switching_policies_at_runtime_carries_the_squeeze_over() -> None:
    """Each policy passes on what the other decided: a graded low window squeezes fully under
    the kernel policy, and survives a kernel report to apply again when graded comes back."""
    clock = ManualClock(10 * NS_PER_S)
    params = Params(squeeze_policy="graded", max_buffer_pages=M, buffer_squeeze_duration_ms=100)
    bus = Bus(params)
    device = bus.add_device("d")
    ring = device.add_ring(CountingAllocator(), clock.now_ns())
    clock.advance_ns(2 * NS_PER_S)  # the ring is idle
    bus.reclaim_memory(clock.now_ns(), PressureLevel.LOW)
    assert ring.target(clock.now_ns()) == M // 2  # graded: an idle ring keeps half at low
    params.set("squeeze_policy", "kernel")
    assert bus.policy.name == "kernel"
    assert ring.target(clock.now_ns()) == 0  # kernel: squeezed until the window's end
    clock.advance_ms(50)
    bus.reclaim_memory(clock.now_ns(), PressureLevel.CRITICAL)  # the kernel's own report
    params.set("squeeze_policy", "graded")
    clock.advance_ms(10)
    # Graded again: its low deadline (at 100 ms) is still there, the kernel's report is not
    # one of its levels.
    assert ring.target(clock.now_ns()) == M // 2
    clock.advance_ms(40)
    assert ring.target(clock.now_ns()) == M
    assert device.squeezed(clock.now_ns())  # the kernel's window (to 150 ms) still runs
