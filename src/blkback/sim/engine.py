"""The discrete-event engine: a virtual clock and a heap of ``(time_ns, seq, callback, arg)``.

Deterministic by construction: events at the same time run in the order they were scheduled
(``seq`` breaks ties, never the callback), all randomness comes from the one
``random.Random(seed)`` that the scenario passes down, and nothing here reads a wall clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

Callback = Callable[[Any, int], None]

_heappush = heapq.heappush
_heappop = heapq.heappop


class SimClock:
    """The virtual clock the core objects see (satisfies :class:`blkback.core.clock.Clock`)."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0

    def now_ns(self) -> int:
        return self.now


class EventLoop:
    """A heap of timed callbacks. ``callback(arg, now_ns)`` runs at its time.

    Args:
        trace: keep a list of ``(time_ns, callback name, repr of arg)`` of every event run,
            for determinism tests and debugging (slow: off by default).
    """

    def __init__(self, *, trace: bool = False) -> None:
        self.clock = SimClock()
        self._heap: list[tuple[int, int, Callback, Any]] = []
        self._seq = itertools.count(1)  # ties at one time run in scheduling order
        self.events = 0
        self.trace: list[tuple[int, str, str]] | None = [] if trace else None

    @property
    def now(self) -> int:
        return self.clock.now

    def at(self, time_ns: int, callback: Callback, arg: Any = None) -> None:
        """Run ``callback(arg, time_ns)`` at ``time_ns`` (not before the current time)."""
        now = self.clock.now
        _heappush(self._heap, (time_ns if time_ns > now else now, next(self._seq), callback, arg))

    def after(self, delay_ns: int, callback: Callback, arg: Any = None) -> None:
        """Run ``callback(arg, now + delay_ns)``."""
        self.at(self.clock.now + delay_ns, callback, arg)

    def run_until(self, end_ns: int) -> None:
        """Run every event with time < ``end_ns``, then set the clock to ``end_ns``."""
        heap = self._heap
        clock = self.clock
        pop = _heappop
        trace = self.trace
        n = 0
        # Pop first and put back the one event that is not due: the keys are unique, so the
        # heap's order afterwards is the same.
        while heap:
            item = pop(heap)
            t, _seq, cb, arg = item
            if t >= end_ns:
                _heappush(heap, item)
                break
            clock.now = t
            if trace is not None:
                trace.append((t, getattr(cb, "__qualname__", repr(cb)), _label(arg)))
            cb(arg, t)
            n += 1
        self.events += n
        if clock.now < end_ns:
            clock.now = end_ns

    def pending(self) -> int:
        """Events still queued."""
        return len(self._heap)


def _label(arg: Any) -> str:
    label = getattr(arg, "label", None)
    if isinstance(label, str):
        return label
    return "" if arg is None else type(arg).__name__
