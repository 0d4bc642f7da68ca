"""The self-tuning squeeze duration: one device's controller, pure and clock-free.

Control law. Each device keeps its own duration ``d``, starting at
``buffer_squeeze_duration_ms`` and always within ``[1 ms, squeeze_ceiling_ms]``. A report
inside an open window extends it to ``now + d``, as the kernel's plain store does. A report
after the window closed judges the window that closed, from what the device's rings did
around it: if the pressure came back within ``d`` of the close while the pools held pages
again (refilled, or never emptied), the window ended in the middle of the pressure and
``d`` doubles ("too short"); otherwise, if the rings allocated pages during the window's
last stretch (after its last report), the squeeze held the pools empty past the pressure
and those pages were taken only to be given back, so ``d`` halves ("wasted reclaim");
with neither, ``d`` stays. The new ``d`` then opens the next window. Doubling on early
returns and halving on quiet tails settles ``d`` near the typical gap between a window's
close and the next report, so a window bridges the gaps inside one pressure episode and
ends soon after the episode does.

Why these observations. A window's length costs only what its rings allocate while it is
open (each request takes fresh pages, which the next pass frees); a squeeze that ends too
early costs the pages the pools take back before the pressure returns. Both are counted
by the rings (``squeezed_alloc_pages``, the pool sizes): the controller needs no clock of
its own and no timer, and does nothing between reports, so without pressure it costs
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from blkback.core.clock import NS_PER_MS

if TYPE_CHECKING:
    from blkback.core.device import Device
    from blkback.core.policy import PressureLevel
    from blkback.core.ring import Ring

FLOOR_NS = NS_PER_MS  # never squeeze for less than 1 ms


@dataclass(frozen=True, slots=True)
class Decision:
    """What the controller did at one report: the deadline to store and why."""

    end_ns: int
    duration_ns: int
    verdict: str  # "start", "extend", "lengthen", "shorten", "keep"
    reason: str


class DurationController:
    """One device's squeeze duration, tuned from the outcome of its previous window."""

    __slots__ = (
        "_allocs_at_last_report",
        "duration_ns",
        "end_ns",
        "last_report_ns",
        "lengthened",
        "reason",
        "shortened",
        "verdict",
    )

    def __init__(self, start_ns: int, ceiling_ns: int) -> None:
        self.duration_ns = clamp(start_ns, ceiling_ns)
        self.end_ns = 0  # end of the current (or last) window; 0: none yet
        self.last_report_ns: int | None = None
        self._allocs_at_last_report = 0
        self.verdict = "start"
        self.reason = "no pressure yet"
        self.lengthened = 0
        self.shortened = 0

    def on_report(
        self, now_ns: int, held_pages: int, squeezed_allocs: int, ceiling_ns: int
    ) -> Decision:
        """A pressure report at ``now_ns``: return the deadline to store, and why.

        Args:
            now_ns: the report's instant.
            held_pages: free pages in the device's pools now.
            squeezed_allocs: pages the device's rings have allocated while squeezed, in all
                (a running total: the controller takes differences).
            ceiling_ns: the longest duration allowed now (``squeeze_ceiling_ms``).
        """
        d = clamp(self.duration_ns, ceiling_ns)
        if now_ns < self.end_ns:
            verdict, reason = "extend", "pressure continues inside the window"
        elif self.last_report_ns is None:
            verdict, reason = "start", "first pressure report"
        else:
            gap = now_ns - self.end_ns
            tail_allocs = squeezed_allocs - self._allocs_at_last_report
            if gap <= d and held_pages > tail_allocs:
                d = clamp(2 * d, ceiling_ns)
                verdict = "lengthen"
                reason = (
                    f"pressure returned {gap / NS_PER_MS:.1f} ms after the window closed "
                    f"with {held_pages} pages back in the pools ({tail_allocs} wasted in its tail)"
                )
                self.lengthened += 1
            elif tail_allocs > 0:
                d = clamp(d // 2, ceiling_ns)
                verdict = "shorten"
                reason = (
                    f"{tail_allocs} pages allocated under the squeeze after its last report "
                    "(wasted reclaim)"
                )
                self.shortened += 1
            else:
                verdict, reason = "keep", "the last window cost nothing and was not too short"
        self.duration_ns = d
        self.end_ns = now_ns + d
        self.last_report_ns = now_ns
        self._allocs_at_last_report = squeezed_allocs
        if verdict != "extend":  # an extension keeps the verdict on the last window
            self.verdict, self.reason = verdict, reason
        return Decision(self.end_ns, d, verdict, reason)

    def state(self) -> dict[str, object]:
        """The controller's state for ``ctl stats --json`` and the metrics."""
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


class AutoPolicy:
    """``squeeze_policy=auto``: the kernel's squeeze, with a duration tuned per device.

    The target is the kernel policy's (0 inside the window, ``max_buffer_pages`` outside);
    only the window's length differs, set by each device's :class:`DurationController`,
    which the device holds (``device.auto``), created at the device's first report.
    """

    name = "auto"

    def on_reclaim(self, device: Device, level: PressureLevel, now_ns: int) -> None:
        params = device.params
        ceiling = params.squeeze_ceiling_ms * NS_PER_MS
        ctl = device.auto
        if ctl is None:
            ctl = DurationController(params.buffer_squeeze_duration_ms * NS_PER_MS, ceiling)
            device.auto = ctl
        held = 0
        squeezed_allocs = 0
        for ring in device.rings:
            held += len(ring.pool)
            squeezed_allocs += ring.stats.squeezed_alloc_pages
        decision = ctl.on_report(now_ns, held, squeezed_allocs, ceiling)
        device.set_squeeze_end(decision.end_ns)
        device.squeeze_level = level

    def target(self, ring: Ring, now_ns: int) -> int:
        if now_ns < ring.device.squeeze_end_ns:
            return 0
        return ring.device.params.max_buffer_pages
