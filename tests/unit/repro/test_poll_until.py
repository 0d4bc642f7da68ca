"""``repro.testbed.poll_until``, the one polling loop of the test bed, on a ManualClock.

The clock jumps to each wait's deadline, so the test sees exactly when each question was
asked, without sleeping.
"""

from __future__ import annotations

import pytest

from blkback.clock import NS_PER_MS, NS_PER_S, ManualClock
from blkback.repro.testbed import poll_until

INTERVAL_NS = 50 * NS_PER_MS


def test_asks_at_once_then_every_interval_until_ready() -> None:
    clock = ManualClock()
    asked: list[int] = []

    def ready() -> bool:
        asked.append(clock.now_ns())
        return len(asked) == 3

    assert poll_until(ready, timeout_ns=NS_PER_S, interval_ns=INTERVAL_NS, clock=clock)
    assert asked == [0, INTERVAL_NS, 2 * INTERVAL_NS]


def test_gives_up_after_asking_once_past_the_deadline() -> None:
    clock = ManualClock(start_ns=7)
    asked: list[int] = []

    def never() -> bool:
        asked.append(clock.now_ns() - 7)
        return False

    assert not poll_until(never, timeout_ns=NS_PER_S, interval_ns=INTERVAL_NS, clock=clock)
    # 0, 50, ..., 1000 ms are within the deadline; 1050 ms is the first past it.
    assert asked == [k * INTERVAL_NS for k in range(22)]


def test_an_error_from_ready_ends_the_wait_at_once() -> None:
    clock = ManualClock()

    def died() -> bool:
        raise RuntimeError("the process it waited for exited")

    with pytest.raises(RuntimeError, match="exited"):
        poll_until(died, timeout_ns=NS_PER_S, interval_ns=INTERVAL_NS, clock=clock)
    assert clock.now_ns() == 0
