"""Clocks. Core objects never read time themselves: a Clock is passed in.

Time is an integer count of nanoseconds on a monotonic scale (like ``time.monotonic_ns``).
Integers keep the squeeze deadline arithmetic exact: ``end = now + d * 1_000_000`` and the
strict comparison ``now < end`` behave as the kernel's ``time_before`` on a 64-bit jiffies
counter, which never wraps in practice (blkback-spec §6.8).
"""

from __future__ import annotations

from typing import Protocol

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000


class Clock(Protocol):
    """A monotonic clock in integer nanoseconds."""

    def now_ns(self) -> int:
        """Return the current time in nanoseconds."""
        ...


class ManualClock:
    """A clock that moves only when told to: for tests and replays."""

    def __init__(self, start_ns: int = 0) -> None:
        self._now_ns = start_ns

    def now_ns(self) -> int:
        return self._now_ns

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
