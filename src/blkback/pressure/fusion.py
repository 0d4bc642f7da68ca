"""What to deliver: signal fusion and storm coalescing, pure and clock-injected.

The monitor feeds every :class:`~blkback.pressure.sources.SourceEvent` to
:meth:`Fuser.observe`, which returns a :class:`Decision`. Nothing here reads a clock or
starts a thread: tests drive it with a :class:`~blkback.clock.ManualClock`.

Fusion (pressure-signals.md A5). Sources play different roles:

* *Onset* sources fire fast and are trusted to trigger: vmpressure (~0.1 s), PSI triggers
  (0.2-2 s, a confirming backstop), MemAvailable, manual reports. Each event triggers a
  delivery at its own level...
* ...but **severity comes from PSI totals** when they are fresh (a sample within
  ``severity_fresh_ns``): the delivered level is ``max(event level, PSI level)``, so a
  vmpressure ``medium`` during heavy stall goes out as ``critical``. PSI totals never lower
  a level: they lag a little, and a fast signal of worse pressure must not be muted.
* *Confirmation*: vmpressure ``low`` fires ~700/s while the page cache merely streams
  (AOSP calls vmpressure "a large number of false positives"). When PSI totals are fresh
  and saw no stall at all, a ``low`` from a source in ``confirm_sources`` is dropped
  (``unconfirmed``), as GLib suppresses events while memory is plentiful.
* PSI totals samples with a level are deliveries in their own right: they keep the squeeze
  going while the stall lasts and stop when it ends.

Coalescing (A4). At most one delivery per ``coalesce_ns`` (default 1 ms): an event within
the window of the last delivery is counted in ``coalesced`` and dropped, unless its level is
higher than the last delivered one, which is never suppressed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blkback.clock import NS_PER_MS
from blkback.core.policy import PressureLevel

LEVELS = (PressureLevel.LOW, PressureLevel.MEDIUM, PressureLevel.CRITICAL)


@dataclass(slots=True)
class FusionConfig:
    """Tunables of the fusion (all times in ns)."""

    coalesce_ns: int = NS_PER_MS
    severity_fresh_ns: int = 250 * NS_PER_MS
    severity_sources: frozenset[str] = frozenset({"psi-total", "psi-total-cgroup"})
    confirm_sources: frozenset[str] = frozenset({"vmpressure"})


@dataclass(frozen=True, slots=True)
class Decision:
    """The fate of one event: ``deliver`` at ``level``, or why not (``reason``)."""

    deliver: bool
    level: PressureLevel | None
    reason: str  # "delivered", "coalesced", "unconfirmed", "sample"


@dataclass(slots=True)
class _Severity:
    level: PressureLevel | None
    at_ns: int


@dataclass(slots=True)
class Fuser:
    """The decision logic; not thread-safe (the monitor holds a lock around it)."""

    config: FusionConfig = field(default_factory=FusionConfig)
    delivered: dict[str, int] = field(default_factory=lambda: {lv.name.lower(): 0 for lv in LEVELS})
    coalesced: int = 0
    unconfirmed: int = 0
    last_delivery_ns: int | None = None
    last_delivery_level: PressureLevel | None = None
    last_delivery_source: str | None = None
    _severity: dict[str, _Severity] = field(default_factory=dict)

    def severity(self, now_ns: int) -> tuple[bool, PressureLevel | None]:
        """(whether a PSI severity sample is fresh, the highest fresh level or None)."""
        fresh = [
            s.level
            for s in self._severity.values()
            if now_ns - s.at_ns <= self.config.severity_fresh_ns
        ]
        levels = [lv for lv in fresh if lv is not None]
        return bool(fresh), (max(levels) if levels else None)

    def observe(
        self, source: str, level: PressureLevel | None, now_ns: int, *, trusted: bool = False
    ) -> Decision:
        """Decide about one event. ``trusted`` (manual reports) skips the confirmation."""
        cfg = self.config
        if source in cfg.severity_sources:
            self._severity[source] = _Severity(level, now_ns)
            if level is None:
                return Decision(False, None, "sample")
        elif level is None:
            return Decision(False, None, "sample")
        assert level is not None
        fresh, sev = self.severity(now_ns)
        if (
            not trusted
            and fresh
            and sev is None
            and level == PressureLevel.LOW
            and source in cfg.confirm_sources
        ):
            self.unconfirmed += 1
            return Decision(False, level, "unconfirmed")
        if sev is not None and sev > level:
            level = sev
        last_ns = self.last_delivery_ns
        last_level = self.last_delivery_level
        if (
            last_ns is not None
            and last_level is not None
            and now_ns - last_ns < cfg.coalesce_ns
            and level <= last_level
        ):
            self.coalesced += 1
            return Decision(False, level, "coalesced")
        self.last_delivery_ns = now_ns
        self.last_delivery_level = level
        self.last_delivery_source = source
        self.delivered[level.name.lower()] += 1
        return Decision(True, level, "delivered")
