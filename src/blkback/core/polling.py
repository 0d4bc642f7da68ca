"""How long a ring busy-polls its socket after a batch: an adaptive window per ring.

KVM's halt-polling (``grow_halt_poll_ns``/``shrink_halt_poll_ns`` in virt/kvm/kvm_main.c)
in a ring's terms. After serving a batch a ring may spin on its socket for ``window_ns``
before it sleeps in ``recv``: a request that arrives within the window is served without a
sleep and two wake-ups (expensive in a VM, where a halt is a VM exit), a window that runs
out is CPU thrown away. The window follows the gaps the ring sees between the end of a batch
and the next request:

* it starts at 0, so a ring that never saw a short gap never spins;
* a request that came after the window ran out but within ``max_ns`` of the batch's end
  would have been caught by a longer window: the window grows (``grow_start_ns``, then
  doubling, at most ``max_ns``);
* a window that ran out and was followed by a long sleep (a gap over ``max_ns``, or no
  request until the ring's receive timed out) was wasted: the window halves, and drops to 0
  below ``grow_start_ns``;
* a request caught in the window changes nothing.

An idle ring spins at most once per idle period, for the window it had then, and a client
whose requests come further apart than ``max_ns`` drives it to 0 for good. Pure: the caller
measures the gaps with its clock and passes them in.
"""

from __future__ import annotations

#: The first non-zero window (KVM's ``halt_poll_ns_grow_start`` default, 10 us).
GROW_START_NS = 10_000


class PollWindow:
    """One ring's busy-poll window, grown and shrunk by the gaps it sees."""

    __slots__ = ("grow_start_ns", "max_ns", "window_ns")

    def __init__(self, max_ns: int, grow_start_ns: int = GROW_START_NS) -> None:
        if max_ns < 0 or grow_start_ns <= 0:
            raise ValueError("the maximum window must be >= 0 and the first window > 0")
        self.max_ns = max_ns
        self.grow_start_ns = min(grow_start_ns, max_ns) if max_ns else grow_start_ns
        self.window_ns = 0

    def slept(self, gap_ns: int) -> None:
        """The window ran out (or was 0), and the next request came ``gap_ns`` after the batch."""
        window = self.window_ns
        if gap_ns <= window:
            return  # it came just as the window ended: the window was long enough
        if gap_ns <= self.max_ns:
            if window < self.max_ns:
                self.window_ns = min(self.max_ns, max(self.grow_start_ns, 2 * window))
        elif window:
            self._shrink()

    def idle(self) -> None:
        """The window ran out and no request came before the ring's receive timed out."""
        if self.window_ns:
            self._shrink()

    def _shrink(self) -> None:
        half = self.window_ns // 2
        self.window_ns = half if half >= self.grow_start_ns else 0
