"""The one Clock protocol and its three clocks: now, and waiting for a deadline or an event."""

from __future__ import annotations

import threading

import pytest

from blkback.clock import NS_PER_MS, Clock, ManualClock, MonotonicClock
from blkback.sim.engine import EventLoop, SimClock


def test_every_clock_is_a_clock() -> None:
    clocks: list[Clock] = [MonotonicClock(), ManualClock(), EventLoop().clock]
    for clock in clocks:
        assert isinstance(clock.now_ns(), int)


def test_manual_clock_waits_by_jumping_to_the_deadline() -> None:
    clock = ManualClock(5 * NS_PER_MS)
    assert clock.wait_until(12 * NS_PER_MS) is False
    assert clock.now_ns() == 12 * NS_PER_MS
    assert clock.wait_until(3 * NS_PER_MS) is False  # a past deadline: no move back
    assert clock.now_ns() == 12 * NS_PER_MS
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance_ns(-1)


def test_manual_clock_returns_at_once_when_the_event_is_set() -> None:
    clock = ManualClock()
    event = threading.Event()
    event.set()
    assert clock.wait_until(NS_PER_MS, event) is True
    assert clock.now_ns() == 0


def test_monotonic_clock_returns_early_for_an_event() -> None:
    clock = MonotonicClock()
    event = threading.Event()
    setter = threading.Timer(0.01, event.set)
    setter.start()
    try:
        # A deadline a minute away: only the event can end this wait within the test.
        assert clock.wait_until(clock.now_ns() + 60_000 * NS_PER_MS, event) is True
    finally:
        setter.cancel()


def test_monotonic_clock_reaches_its_deadline() -> None:
    clock = MonotonicClock()
    deadline = clock.now_ns() + 2 * NS_PER_MS
    assert clock.wait_until(deadline) is False
    assert clock.now_ns() >= deadline
    assert clock.wait_until(deadline, threading.Event()) is False  # past deadline, unset event


def test_sim_clock_waiting_runs_the_simulation_to_the_deadline() -> None:
    loop = EventLoop()
    clock = loop.clock
    assert isinstance(clock, SimClock)
    event = threading.Event()
    ran: list[int] = []
    loop.at(5, lambda _arg, now: ran.append(now))
    loop.at(7, lambda _arg, _now: event.set())
    loop.at(30, lambda _arg, now: ran.append(now))
    assert clock.wait_until(10) is False  # no event given: the simulation just runs to 10
    assert ran == [5]
    assert clock.now_ns() == 10
    assert clock.wait_until(20, event) is True  # set at 7 by the simulation
    assert clock.now_ns() == 10
