"""The adaptive busy-poll window of a ring (core/polling.py), driven by a ManualClock."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from blkback.clock import NS_PER_MS, NS_PER_US, ManualClock
from blkback.core.polling import GAIN, GROW_START_NS, TIE, PollWindow

RECV_TIMEOUT_NS = 100 * NS_PER_MS  # the ring's receive times out after one pass interval


@dataclass
class Spins:
    """What a ring spent spinning: windows spun, windows that caught a request, time."""

    windows: int = 0
    hits: int = 0
    spun_ns: int = 0


def _serve(window: PollWindow, clock: ManualClock, gaps_ns: list[int], spins: Spins) -> None:
    """A ring's receive after each batch, as Connection does it: spin for the window; if the
    next request (``gap`` after the batch ended) comes later, sleep and tell the window the
    gap, or that the ring went idle (its receive timed out first)."""
    for gap in gaps_ns:
        batch_end = clock.now_ns()
        w = window.window_ns
        if w:
            spins.windows += 1
        if gap <= w:
            clock.advance_ns(gap)
            spins.hits += 1
            spins.spun_ns += gap
            continue
        spins.spun_ns += w
        if gap >= RECV_TIMEOUT_NS:
            clock.advance_ns(RECV_TIMEOUT_NS)
            window.idle()
            clock.advance_ns(gap - RECV_TIMEOUT_NS)  # it rests until the request comes
        else:
            clock.advance_ns(gap)
            window.slept(clock.now_ns() - batch_end)


def test_the_window_starts_at_zero() -> None:
    assert PollWindow(50 * NS_PER_US).window_ns == 0


def test_short_gaps_grow_the_window_from_its_start_by_doubling_until_it_catches_them() -> None:
    clock = ManualClock()
    window = PollWindow(100 * NS_PER_US)
    seen = []
    spins = Spins()
    for _ in range(6):
        _serve(window, clock, [30 * NS_PER_US], spins)
        seen.append(window.window_ns)
    us = NS_PER_US
    assert seen == [10 * us, 20 * us, 40 * us, 40 * us, 40 * us, 40 * us]
    assert spins.windows == 5 and spins.hits == 3  # 10 and 20 missed; 40 catches every one
    assert spins.spun_ns == 10 * us + 20 * us + 3 * 30 * us


def test_the_window_never_grows_past_its_maximum() -> None:
    clock = ManualClock()
    window = PollWindow(50 * NS_PER_US)
    spins = Spins()
    _serve(window, clock, [45 * NS_PER_US] * 20, spins)
    assert window.window_ns == 50 * NS_PER_US  # 10, 20, 40, then 50 (not 80)
    assert spins.hits == 20 - 4


def test_gaps_beyond_the_maximum_never_start_a_window() -> None:
    """A sparse client (a request every millisecond) is never spun for."""
    clock = ManualClock()
    window = PollWindow(50 * NS_PER_US)
    spins = Spins()
    _serve(window, clock, [NS_PER_MS] * 1000, spins)
    assert window.window_ns == 0
    assert spins == Spins(windows=0, hits=0, spun_ns=0)


def test_a_long_gap_after_a_wasted_window_halves_it_and_below_the_start_drops_it_to_zero() -> None:
    clock = ManualClock()
    window = PollWindow(80 * NS_PER_US)
    _serve(window, clock, [70 * NS_PER_US] * 5, Spins())
    assert window.window_ns == 80 * NS_PER_US
    seen = []
    for _ in range(4):
        _serve(window, clock, [NS_PER_MS], Spins())
        seen.append(window.window_ns)
    assert seen == [40 * NS_PER_US, 20 * NS_PER_US, 10 * NS_PER_US, 0]


def test_a_request_caught_in_the_window_changes_nothing() -> None:
    clock = ManualClock()
    window = PollWindow(100 * NS_PER_US)
    _serve(window, clock, [30 * NS_PER_US] * 3, Spins())
    assert window.window_ns == 40 * NS_PER_US
    _serve(window, clock, [NS_PER_US, 39 * NS_PER_US, 5 * NS_PER_US], Spins())
    assert window.window_ns == 40 * NS_PER_US
    window.slept(40 * NS_PER_US)  # it came just as the window ended
    assert window.window_ns == 40 * NS_PER_US


def test_an_idle_ring_spins_once_at_most_then_never() -> None:
    """A burst of QD1 requests, then nothing for a minute, then a request every second."""
    clock = ManualClock()
    window = PollWindow(50 * NS_PER_US)
    _serve(window, clock, [20 * NS_PER_US] * 100, Spins())
    assert window.window_ns == 20 * NS_PER_US
    spins = Spins()
    _serve(window, clock, [60 * 1000 * NS_PER_MS], spins)
    assert spins == Spins(windows=1, hits=0, spun_ns=20 * NS_PER_US)  # the last window
    assert window.window_ns == 10 * NS_PER_US
    spins = Spins()
    _serve(window, clock, [1000 * NS_PER_MS] * 60, spins)
    assert spins.windows == 1 and spins.spun_ns == 10 * NS_PER_US
    assert window.window_ns == 0


def test_idle_halves_a_window_and_leaves_zero_alone() -> None:
    window = PollWindow(50 * NS_PER_US)
    window.idle()
    assert window.window_ns == 0
    window.slept(5 * NS_PER_US)
    assert window.window_ns == GROW_START_NS
    window.slept(15 * NS_PER_US)
    window.slept(30 * NS_PER_US)
    assert window.window_ns == 40 * NS_PER_US
    window.idle()
    assert window.window_ns == 20 * NS_PER_US


def test_a_maximum_below_the_start_caps_the_first_window() -> None:
    window = PollWindow(4 * NS_PER_US)
    window.slept(3 * NS_PER_US)
    assert window.window_ns == 4 * NS_PER_US


@pytest.mark.parametrize(
    ("max_ns", "start_ns", "epoch", "hold"),
    [(-1, GROW_START_NS, 8, 2), (NS_PER_US, 0, 8, 2), (NS_PER_US, 1, 0, 2), (NS_PER_US, 1, 8, 0)],
)
def test_bad_bounds_are_refused(max_ns: int, start_ns: int, epoch: int, hold: int) -> None:
    with pytest.raises(ValueError, match="window"):
        PollWindow(max_ns, start_ns, epoch_batches=epoch, hold_epochs=hold)


EPOCH = 8
HOLD = 3


def _epochs(
    window: PollWindow,
    cpu: ManualClock,
    costs_ns: tuple[int, int],
    n: int,
    walls_ns: tuple[int, int] = (20_000, 20_000),
    requests: tuple[int, int] = (1, 1),
) -> list[bool]:
    """Serve ``n`` epochs of batches of ``requests[spinning]`` requests whose CPU cost is
    ``costs_ns[spinning]`` each and whose wall time is ``walls_ns[spinning]`` (the ring's CPU
    time kept by ``cpu``, the wall clock by its own ManualClock); return whether the ring
    spun in each epoch."""
    wall = ManualClock()
    served = 0
    spun = []
    for _ in range(n):
        spun.append(window.spinning)
        for _ in range(EPOCH):
            cpu.advance_ns(costs_ns[window.spinning])
            wall.advance_ns(walls_ns[window.spinning])
            served += requests[window.spinning]
            if window.batch_served():
                window.epoch_over(cpu.now_ns(), wall.now_ns(), served)
    return spun


def test_spinning_is_tried_and_kept_while_it_costs_no_more_cpu_than_sleeping() -> None:
    cpu = ManualClock()
    window = PollWindow(50 * NS_PER_US, epoch_batches=EPOCH, hold_epochs=HOLD)
    # The first epoch starts the CPU clock, then a trial: sleeping, spinning; then the hold.
    spun = _epochs(window, cpu, (10_000, 9_000), 1 + 2 + HOLD + 2 + HOLD)
    assert spun == [False, False, True, *[True] * HOLD, False, True, *[True] * HOLD]


def test_spinning_that_costs_more_cpu_than_sleeping_runs_one_epoch_per_round() -> None:
    cpu = ManualClock()
    window = PollWindow(50 * NS_PER_US, epoch_batches=EPOCH, hold_epochs=HOLD)
    spun = _epochs(window, cpu, (8_000, 13_000), 1 + 3 * (2 + HOLD))
    assert spun == [False, *([False, True, *[False] * HOLD] * 3)]
    assert sum(spun) == 3  # the trials only


def test_a_tie_goes_to_spinning_that_buys_latency_and_more_than_the_tie_to_sleeping() -> None:
    """A QD1 client: spinning halves the wall time per request."""
    for extra, kept in ((TIE / 2, True), (2 * TIE, False)):
        cpu = ManualClock()
        window = PollWindow(50 * NS_PER_US, epoch_batches=EPOCH, hold_epochs=HOLD)
        costs = (10_000, round(10_000 * (1 + extra)))
        spun = _epochs(window, cpu, costs, 1 + 2 + 1, walls_ns=(40_000, 20_000))
        assert spun[-1] is kept


def test_spinning_that_buys_no_latency_is_dropped_at_a_cpu_premium_within_the_tie() -> None:
    """A QD16 client: the socket is seldom empty after a batch, so spinning serves it hardly
    faster (5 %): a CPU premium within the tie is not paid for that; for 20 % it is."""
    for gain, kept in ((GAIN / 2, False), (2 * GAIN, True)):
        cpu = ManualClock()
        window = PollWindow(50 * NS_PER_US, epoch_batches=EPOCH, hold_epochs=HOLD)
        walls = (40_000, round(40_000 * (1 - gain)))
        spun = _epochs(window, cpu, (10_000, 10_200), 1 + 2 + HOLD, walls_ns=walls)
        assert spun[3:] == [kept] * HOLD


def test_spinning_that_costs_no_more_cpu_is_kept_without_buying_latency() -> None:
    cpu = ManualClock()
    window = PollWindow(50 * NS_PER_US, epoch_batches=EPOCH, hold_epochs=HOLD)
    spun = _epochs(window, cpu, (10_000, 10_000), 1 + 2 + HOLD, walls_ns=(20_000, 20_500))
    assert spun[3:] == [True] * HOLD


def test_spinning_that_slows_the_ring_down_is_dropped_even_when_it_costs_less_cpu() -> None:
    """An oversubscribed machine: the spinner takes the CPU its client needs."""
    cpu = ManualClock()
    window = PollWindow(50 * NS_PER_US, epoch_batches=EPOCH, hold_epochs=HOLD)
    spun = _epochs(window, cpu, (10_000, 9_000), 1 + 2 + HOLD, walls_ns=(20_000, 25_000))
    assert spun == [False, False, True, *[False] * HOLD]


def test_the_cost_is_per_request_not_per_batch() -> None:
    """Spinning catches each 1 MiB write alone (batches of 1) where sleeping drained 5 at a
    time: cheaper per batch (150 against 600 us), dearer per request (150 against 120 us)."""
    cpu = ManualClock()
    window = PollWindow(50 * NS_PER_US, epoch_batches=EPOCH, hold_epochs=HOLD)
    spun = _epochs(
        window,
        cpu,
        (600_000, 150_000),
        1 + 2 + HOLD,
        walls_ns=(700_000, 160_000),
        requests=(5, 1),
    )
    assert spun == [False, False, True, *[False] * HOLD]


def test_the_window_is_learnt_only_by_the_gaps_whatever_the_cost_says() -> None:
    """Sleeping epochs do not forget the window: a trial of spinning starts where it was."""
    cpu = ManualClock()
    window = PollWindow(50 * NS_PER_US, epoch_batches=EPOCH, hold_epochs=HOLD)
    window.slept(15 * NS_PER_US)
    window.slept(15 * NS_PER_US)
    assert window.window_ns == 20 * NS_PER_US
    _epochs(window, cpu, (5_000, 9_000), 1 + 2 + HOLD)
    assert window.window_ns == 20 * NS_PER_US and not window.spinning
