"""The discrete-event engine: a virtual clock and a heap of ``(time_ns, seq, callback, arg)``.

Deterministic by construction: events at the same time run in the order they were scheduled
(``seq`` breaks ties, never the callback), all randomness comes from the one
``random.Random(seed)`` that the scenario passes down, and nothing here reads a wall clock.

Events scheduled with one fixed delay from the current time (:meth:`EventLoop.after_fixed`:
the disks' I/O quantum, most of a run's events) go to a FIFO queue instead of the heap: the
clock never goes back and ``seq`` only grows, so that queue is in ``(time_ns, seq)`` order as
it is appended, and the loop merges it with the heap. The order of events is the same.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blkback.clock import Event

Callback = Callable[[Any, int], None]

_heappush = heapq.heappush
_heappop = heapq.heappop


class SimClock:
    """The simulation's virtual time, as a :class:`blkback.clock.Clock`.

    Waiting runs the event loop up to the deadline (events inside the simulation never wait:
    they schedule). An event set by a simulated callback is seen when the wait returns.
    """

    __slots__ = ("_loop", "now")

    def __init__(self, loop: EventLoop) -> None:
        self.now = 0
        self._loop = loop

    def now_ns(self) -> int:
        return self.now

    def wait_until(self, deadline_ns: int, event: Event | None = None) -> bool:
        if event is not None and event.is_set():
            return True
        self._loop.run_until(deadline_ns)
        return event is not None and event.is_set()


class EventLoop:
    """A heap of timed callbacks. ``callback(arg, now_ns)`` runs at its time.

    Args:
        trace: keep a list of ``(time_ns, callback name, repr of arg)`` of every event run,
            for determinism tests and debugging (slow: off by default).
    """

    def __init__(self, *, trace: bool = False) -> None:
        self.clock = SimClock(self)
        self._heap: list[tuple[int, int, Callback, Any]] = []
        self._fifo: deque[tuple[int, int, Callback, Any]] = deque()  # see after_fixed
        self._fifo_delay = -1
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

    def after_fixed(self, delay_ns: int, callback: Callback, arg: Any = None) -> None:
        """:meth:`after` for a delay that many events share (a periodic tick): cheaper.

        The first delay given (again whenever the queue is empty) is the queue's; other
        delays go to the heap. Either way the event runs exactly as with :meth:`after`.
        """
        if delay_ns != self._fifo_delay:
            if self._fifo or delay_ns < 0:
                self.at(self.clock.now + delay_ns, callback, arg)
                return
            self._fifo_delay = delay_ns
        self._fifo.append((self.clock.now + delay_ns, next(self._seq), callback, arg))

    def run_until(self, end_ns: int) -> None:
        """Run every event with time < ``end_ns``, then set the clock to ``end_ns``."""
        heap = self._heap
        fifo = self._fifo
        popleft = fifo.popleft
        clock = self.clock
        pop = _heappop
        trace = self.trace
        n = 0
        while True:
            # the earlier of the heap's first event and the queue's (keys are unique)
            if fifo:
                item = fifo[0]
                if heap and heap[0] < item:
                    item = heap[0]
                    if item[0] >= end_ns:
                        break
                    pop(heap)
                else:
                    if item[0] >= end_ns:
                        break
                    popleft()
            elif heap:
                item = heap[0]
                if item[0] >= end_ns:
                    break
                pop(heap)
            else:
                break
            t, _seq, cb, arg = item
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
        return len(self._heap) + len(self._fifo)


def _label(arg: Any) -> str:
    label = getattr(arg, "label", None)
    if isinstance(label, str):
        return label
    return "" if arg is None else type(arg).__name__
