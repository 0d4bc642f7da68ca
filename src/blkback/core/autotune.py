"""The self-tuning squeeze duration of ``squeeze_policy=auto``: one device's control law.

Control law. Each device keeps its own duration ``d``, starting at
``buffer_squeeze_duration_ms`` and always within ``[1 ms, squeeze_ceiling_ms]``. A report
inside an open window extends it to ``now + d``, as the kernel's plain store does. A report
after the window closed first judges the window that closed, from what the device's rings
did around it: if the pressure came back within ``4 d`` of the close (``RETURN_WINDOWS``)
and the pools held pages again (refilled, or never emptied) worth more than what the rings
allocated under the window's quiet tail (the time after its last report), a held page
counting as 4 tail pages (``HELD_WEIGHT``), the window ended in the middle of the pressure
and ``d`` doubles ("too short"); otherwise, if the rings allocated pages under that quiet
tail, the squeeze held the pools empty past the pressure and those pages were taken only to
be given back, so ``d`` halves ("wasted reclaim"); with neither, ``d`` stays. The new ``d``
then opens the next window. Early returns double and wasteful tails halve, so ``d`` settles
where a longer window would allocate under its tail about four times what the pools would
take back before the next report: long enough to bridge the gaps inside one pressure
episode, short enough to end soon after it.

Why these observations. A window's length costs what its rings allocate while it is open
(each request takes fresh pages, which the next pass frees: ``squeezed_alloc_pages``); a
window that ends too early costs the pages the pools take back before the pressure
returns (the pool sizes at the next report). Both are counted by the rings, so the law
needs no clock and no timer of its own; it runs only at reports, so without pressure it
costs nothing. The state is a frozen value: the policy returns a new one in each decision
and the device stores it with the deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

from blkback.clock import NS_PER_MS

FLOOR_NS = NS_PER_MS  # never squeeze for less than 1 ms
# The two constants of the law. A page the pools hold again when the pressure returns is
# memory the host must reclaim once more (from someone: swap), while a page allocated under
# a quiet tail costs an allocation and a free: hence the weight. Both were chosen on the
# `blkback sim policies` grid among (1, 1), (2, 2) and (4, 4): see docs/sim/policies.
RETURN_WINDOWS = 4  # pressure back within this many durations of the close is "early"
HELD_WEIGHT = 4  # a page held again before the pressure returns, in pages wasted by a tail


@dataclass(frozen=True, slots=True)
class PoolFacts:
    """What a device's rings did, as the auto policy reads it at a report.

    Attributes:
        held_pages: free pages in the device's pools now.
        squeezed_alloc_pages: pages the rings have allocated while the device was squeezed,
            a running total (the law takes differences between reports).
    """

    held_pages: int = 0
    squeezed_alloc_pages: int = 0


NO_FACTS = PoolFacts()


@dataclass(frozen=True, slots=True)
class AutoState:
    """One device's duration in force, the last verdict and why, and the law's memory.

    Attributes:
        duration_ns: the duration the next window opens with.
        verdict: "start", "lengthen", "shorten" or "keep": the judgement of the last window.
        reason: that judgement in words (``ctl stats``).
        lengthened, shortened: how many times ``d`` doubled and halved.
        allocs_at_last_report: ``squeezed_alloc_pages`` at the last report (the quiet tail's
            allocations are the difference at the next one).
        reported: whether any report reached the device yet.
    """

    duration_ns: int
    verdict: str = "start"
    reason: str = "no pressure yet"
    lengthened: int = 0
    shortened: int = 0
    allocs_at_last_report: int = 0
    reported: bool = False

    @classmethod
    def starting(cls, start_ns: int, ceiling_ns: int) -> AutoState:
        """The state before any report: ``start_ns`` within the bounds."""
        return cls(clamp(start_ns, ceiling_ns))

    def after_report(
        self, now_ns: int, window_end_ns: int, facts: PoolFacts, ceiling_ns: int
    ) -> AutoState:
        """The state after a report at ``now_ns``; the new window is ``now_ns + duration_ns``.

        Args:
            now_ns: the report's instant.
            window_end_ns: the end of the window in force before this report (0: none yet).
            facts: the device's pools and allocation count now.
            ceiling_ns: the longest duration allowed now (``squeeze_ceiling_ms``).
        """
        d = clamp(self.duration_ns, ceiling_ns)
        allocs = facts.squeezed_alloc_pages
        if now_ns < window_end_ns or not self.reported:
            verdict, reason = self.verdict, self.reason
            if not self.reported:
                verdict, reason = "start", "first pressure report"
            return AutoState(
                d, verdict, reason, self.lengthened, self.shortened, allocs, reported=True
            )
        gap = now_ns - window_end_ns
        tail = allocs - self.allocs_at_last_report
        held = facts.held_pages
        lengthened, shortened = self.lengthened, self.shortened
        if gap <= RETURN_WINDOWS * d and HELD_WEIGHT * held > tail:
            d = clamp(2 * d, ceiling_ns)
            verdict = "lengthen"
            reason = (
                f"pressure returned {gap / NS_PER_MS:.1f} ms after the window closed, with "
                f"{held} pages back in the pools ({tail} allocated under its quiet tail)"
            )
            lengthened += 1
        elif tail > 0:
            d = clamp(d // 2, ceiling_ns)
            verdict = "shorten"
            reason = f"{tail} pages allocated under the window's quiet tail (wasted reclaim)"
            shortened += 1
        else:
            verdict = "keep"
            reason = "the last window cost nothing and pressure did not return within it"
        return AutoState(d, verdict, reason, lengthened, shortened, allocs, reported=True)

    def snapshot(self) -> dict[str, object]:
        """The state for ``ctl stats --json`` and the metrics."""
        return {
            "duration_ms": self.duration_ns / NS_PER_MS,
            "verdict": self.verdict,
            "reason": self.reason,
            "lengthened": self.lengthened,
            "shortened": self.shortened,
        }


def clamp(duration_ns: int, ceiling_ns: int) -> int:
    """``duration_ns`` within ``[FLOOR_NS, max(FLOOR_NS, ceiling_ns)]``."""
    if duration_ns > ceiling_ns:
        duration_ns = ceiling_ns
    return duration_ns if duration_ns > FLOOR_NS else FLOOR_NS
