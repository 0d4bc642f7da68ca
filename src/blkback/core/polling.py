"""Whether and how long a ring busy-polls its socket after a batch: adaptive, per ring.

Two questions, two mechanisms.

**How long** (the window). KVM's halt-polling (``grow_halt_poll_ns``/``shrink_halt_poll_ns``
in virt/kvm/kvm_main.c) in a ring's terms. After serving a batch a ring may spin on its
socket for ``window_ns`` before it sleeps in ``recv``: a request that arrives within the
window is served without a sleep and two wake-ups, a window that runs out is CPU thrown
away. The window follows the gaps the ring sees between the end of a batch and the next
request:

* it starts at 0, so a ring that never saw a short gap never spins;
* a request that came after the window ran out but within ``max_ns`` of the batch's end
  would have been caught by a longer window: the window grows (``grow_start_ns``, then
  doubling, at most ``max_ns``);
* a window that ran out and was followed by a long sleep (a gap over ``max_ns``, or no
  request until the ring's receive timed out) was wasted: the window halves, and drops to 0
  below ``grow_start_ns``;
* a request caught in the window changes nothing.

An idle ring spins at most once per idle period, for the window it had then, and a client
whose requests come further apart than ``max_ns`` drives it to 0 for good.

**Whether** (the cost). Spinning through a gap costs the gap; sleeping costs a sleep and a
wake-up, whose price depends on the machine's state (on an idle VM's vCPU a halt and the
wake-up IPI are expensive; on a busy one they are cheap, and a spinning ring takes the CPU
its own client needs). The window cannot see that; the ring's CPU time and wall time per
request can. The ring's life is cut into epochs of ``epoch_batches`` batches: a *trial* pair
(one epoch with spinning off, one with it on), then ``hold_epochs`` epochs of the choice
the trial favoured, then trials again. Spinning is kept only where it pays:

* never when it takes more than ``1 + TIE`` times the wall time per request of sleeping (on
  an oversubscribed machine a spinner can cost no more CPU yet slow its client down);
* when it costs no more CPU per request than sleeping;
* when it costs at most ``1 + TIE`` times that CPU, only if it buys latency: at most
  ``1 - GAIN`` times the wall time per request. A ring whose socket is seldom empty after a
  batch (4 KiB at QD16) catches every request within a microsecond; its spins only cut the
  batches smaller and buy nothing, so the premium is not paid there.

The worse choice thus runs at most one epoch in ``hold_epochs + 2``.

Pure: the caller measures the gaps, the ring thread's CPU time and its count of requests,
and passes them in.
"""

from __future__ import annotations

from typing import Final

#: The first non-zero window (KVM's ``halt_poll_ns_grow_start`` default, 10 us).
GROW_START_NS: Final = 10_000
#: Batches per epoch (at QD1 4 KiB, 25-50 ms of a busy ring).
EPOCH_BATCHES: Final = 1024
#: Epochs the cheaper choice is kept before the two are tried again.
HOLD_EPOCHS: Final = 14
#: Spinning may cost at most this much more CPU (or wall time) per request than sleeping.
TIE: Final = 0.05
#: A spin that costs more CPU than sleeping must cut the wall time per request by this much.
GAIN: Final = 0.10

_TRY_OFF, _TRY_ON, _HOLD = 0, 1, 2


class PollWindow:
    """One ring's busy polling: the window (by the gaps) and whether to spin (by the cost)."""

    __slots__ = (
        "_cost_off",
        "_epoch_cpu_ns",
        "_epoch_requests",
        "_epoch_wall_ns",
        "_epochs_left",
        "_phase",
        "_wall_off",
        "batches",
        "epoch_batches",
        "grow_start_ns",
        "hold_epochs",
        "max_ns",
        "spinning",
        "window_ns",
    )

    def __init__(
        self,
        max_ns: int,
        grow_start_ns: int = GROW_START_NS,
        *,
        epoch_batches: int = EPOCH_BATCHES,
        hold_epochs: int = HOLD_EPOCHS,
    ) -> None:
        if max_ns < 0 or grow_start_ns <= 0 or epoch_batches <= 0 or hold_epochs <= 0:
            raise ValueError(
                "the maximum window must be >= 0; the first window, the epoch and the hold > 0"
            )
        self.max_ns = max_ns
        self.grow_start_ns = min(grow_start_ns, max_ns) if max_ns else grow_start_ns
        self.window_ns = 0  # the learnt window; spun only while ``spinning``
        self.epoch_batches = epoch_batches
        self.hold_epochs = hold_epochs
        self.spinning = False  # the first epoch measures sleeping
        self.batches = 0  # batches served in the current epoch
        self._phase = _TRY_OFF
        self._epoch_cpu_ns = -1  # the ring's CPU time when the epoch began (-1: not yet)
        self._epoch_wall_ns = 0  # the wall clock then
        self._epoch_requests = 0  # the ring's requests served then
        self._cost_off = 0.0  # CPU per request of the last trial without spinning
        self._wall_off = 0.0  # and its wall time per request
        self._epochs_left = 0

    # -- the window ----------------------------------------------------------------------
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

    # -- the cost ------------------------------------------------------------------------
    def batch_served(self) -> bool:
        """Count a batch; True when the epoch is over (then call :meth:`epoch_over`)."""
        self.batches += 1
        return self.batches >= self.epoch_batches

    def epoch_over(self, cpu_ns: int, now_ns: int, requests: int) -> None:
        """The epoch's last batch was served; ``cpu_ns``: the ring thread's CPU time now,
        ``now_ns``: the monotonic clock now, ``requests``: the requests the ring has served.

        Costs are per request, not per batch: a spin that catches each request as it comes
        makes batches smaller, so it would look cheaper per batch while costing more per
        request (1 MiB writes drained 4-6 to a batch without spinning).
        """
        start = self._epoch_cpu_ns
        served = max(1, requests - self._epoch_requests)
        cost = (cpu_ns - start) / served
        wall = (now_ns - self._epoch_wall_ns) / served
        self._epoch_cpu_ns = cpu_ns
        self._epoch_wall_ns = now_ns
        self._epoch_requests = requests
        self.batches = 0
        if start < 0:
            return  # the first epoch only starts the clocks: measure it again
        if self._phase == _TRY_OFF:
            self._cost_off = cost
            self._wall_off = wall
            self._phase = _TRY_ON
            self.spinning = True
        elif self._phase == _TRY_ON:
            self.spinning = self._spinning_pays(cost, wall)
            self._phase = _HOLD
            self._epochs_left = self.hold_epochs
        elif self._epochs_left > 1:
            self._epochs_left -= 1
        else:
            self._phase = _TRY_OFF
            self.spinning = False

    def _spinning_pays(self, cost: float, wall: float) -> bool:
        """Whether the spinning trial (``cost`` CPU, ``wall`` time per request) beat sleeping."""
        if wall > self._wall_off * (1 + TIE):
            return False  # it slows the client down
        if cost <= self._cost_off:
            return True
        return cost <= self._cost_off * (1 + TIE) and wall <= self._wall_off * (1 - GAIN)
