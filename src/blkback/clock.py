"""Time: one :class:`Clock` protocol and its three clocks. Nothing else reads time to schedule.

Time is an integer count of nanoseconds on a monotonic scale (like ``time.monotonic_ns``).
Integers keep the squeeze deadline arithmetic exact: ``end = now + d * NS_PER_MS`` and the
strict comparison ``now < end`` behave as the kernel's ``time_before`` on a 64-bit jiffies
counter, which never wraps in practice (blkback-spec §6.8).

A clock does two things: it tells the time (:meth:`Clock.now_ns`) and it waits until a
deadline, or until an event is set if that comes first (:meth:`Clock.wait_until`). The three
clocks:

* :class:`MonotonicClock`, the real one (``time.monotonic_ns``): waiting blocks the thread.
* :class:`ManualClock`, for tests: it moves only when told to, and waiting jumps it to the
  deadline, so a test sees how long each wait was without sleeping.
* ``blkback.sim.engine.SimClock``, the simulator's virtual time: waiting runs the simulation's
  events up to the deadline.

This module is a leaf, like :mod:`blkback.errors`: every package may import it. The pure
``core`` takes only the protocol and the constants from it, and reads time only from the
``now_ns`` values it is handed.
"""

from __future__ import annotations

import time
from typing import Final, Protocol

NS_PER_US: Final = 1_000
NS_PER_MS: Final = 1_000_000
NS_PER_S: Final = 1_000_000_000


class Event(Protocol):
    """Something a waiter can be woken by (:class:`threading.Event` is one)."""

    def is_set(self) -> bool:
        """Whether the event has happened."""
        ...

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the event happens or ``timeout`` seconds pass; return :meth:`is_set`."""
        ...


class Clock(Protocol):
    """A monotonic clock in integer nanoseconds that can wait."""

    def now_ns(self) -> int:
        """Return the current time in nanoseconds."""
        ...

    def wait_until(self, deadline_ns: int, event: Event | None = None) -> bool:
        """Return at ``deadline_ns``, or as soon as ``event`` is set; return whether it is."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic_ns``; waiting blocks the calling thread."""

    # The C function itself rather than a method that calls it: a ring reads the clock a
    # few times per request, and a Python frame around the call cost more than the reading.
    now_ns = staticmethod(time.monotonic_ns)

    def wait_until(self, deadline_ns: int, event: Event | None = None) -> bool:
        left_ns = deadline_ns - time.monotonic_ns()
        if event is None:
            if left_ns > 0:
                time.sleep(left_ns / NS_PER_S)
            return False
        if left_ns <= 0:
            return event.is_set()
        return event.wait(left_ns / NS_PER_S)


class ManualClock:
    """A clock that moves only when told to, or when someone waits on it: tests and replays.

    Waiting does not block: it jumps the clock to the deadline (unless the event is set
    already), as if the wait had passed in no time. A test thus sees exactly how long each
    wait was, without sleeping.
    """

    def __init__(self, start_ns: int = 0) -> None:
        self._now_ns = start_ns

    def now_ns(self) -> int:
        return self._now_ns

    def wait_until(self, deadline_ns: int, event: Event | None = None) -> bool:
        if event is not None and event.is_set():
            return True
        if deadline_ns > self._now_ns:
            self._now_ns = deadline_ns
        return False

    def advance_ns(self, delta_ns: int) -> None:
        """Move the clock forward by ``delta_ns``; refuses to go backwards."""
        if delta_ns < 0:
            raise ValueError(f"a monotonic clock cannot go back ({delta_ns} ns)")
        self._now_ns += delta_ns

    def advance_ms(self, delta_ms: float) -> None:
        """Move the clock forward by ``delta_ms`` milliseconds."""
        self.advance_ns(round(delta_ms * NS_PER_MS))

    def set_ns(self, now_ns: int) -> None:
        """Jump to an absolute time at or after the current one."""
        self.advance_ns(now_ns - self._now_ns)


def thread_cpu_ns() -> int:
    """The calling thread's CPU time (user + system), ns: a cost to measure, never a time to
    wait for (a ring weighs busy polling by it, see ``core/polling.py``)."""
    return time.thread_time_ns()
