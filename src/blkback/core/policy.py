"""Squeeze policies: what a pressure report decides for a device, and each ring's pool target.

The kernel's policy (Linux 5.6+, blkback-spec §3): ``reclaim_memory`` sets
``squeeze_end = now + buffer_squeeze_duration_ms`` (a plain store, not a max), and every ring
loop pass shrinks the pool to 0 while ``now < squeeze_end`` and to ``max_buffer_pages``
otherwise. The level of the report is ignored: any pressure squeezes.

The squeeze flows one way. A policy is pure and knows neither devices nor rings:

* :meth:`SqueezePolicy.decide` takes the :class:`SqueezeDecision` in force, the report and the
  parameters, and *returns* the new decision; the device stores it (per device, or on the bus
  when ``squeeze_scope`` is ``global``).
* :meth:`SqueezePolicy.target` takes that stored decision and the facts of one ring (its last
  I/O) and returns the pool size the ring's pass shrinks to.

Stale instants. In the kernel a ring reads ``jiffies`` at the moment it tests the deadline.
Here a pass is evaluated at an instant its runner read a little earlier (a ring thread reads
the clock and then waits for the ring lock that a wake pass holds; a queued wake pass runs
at the instant of the report that woke it). A report with a duration of 0 opens no window
in wall-clock time, so it must not squeeze such a pass either: a report whose new deadline
is not ahead of it leaves a deadline that has already passed untouched (:func:`store_deadline`).
Every pass at or after the report sees the same answer either way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from blkback.clock import NS_PER_MS, NS_PER_S
from blkback.core.autotune import AutoState, PoolFacts
from blkback.core.params import Params


class PressureLevel(enum.IntEnum):
    """Severity of a memory pressure report (vmpressure's levels; PSI maps onto them)."""

    LOW = 1
    MEDIUM = 2
    CRITICAL = 3

    @classmethod
    def parse(cls, text: str) -> PressureLevel:
        """``"low"``/``"medium"``/``"critical"`` (any case) to a level, or ValueError."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown pressure level {text!r} (low, medium, critical)") from None


NO_LEVEL_ENDS = (0, 0, 0)


@dataclass(frozen=True, slots=True)
class SqueezeDecision:
    """The squeeze state a policy decided at a report; the device stores it as it is.

    A decision is replaced whole, never changed: a ring thread that read the decision in force
    keeps a consistent one while a reporter thread stores the next.

    Attributes:
        end_ns: the squeeze window's end: the device is squeezed while ``now < end_ns``
            (the kernel's ``buffer_squeeze_end``; 0 before any report).
        level: the pressure level in force right after the report (``ctl stats``), or None.
        level_ends_ns: the deadline of each level, indexed by ``level - 1`` (0: never set),
            for policies that answer by level. Policies that do not use it pass it on.
        auto: the auto policy's tuned duration and its reasons (None until auto decides).
            Policies that do not use it pass it on, so a switch away and back keeps it.
    """

    end_ns: int = 0
    level: PressureLevel | None = None
    level_ends_ns: tuple[int, int, int] = NO_LEVEL_ENDS
    auto: AutoState | None = None

    def level_at(self, now_ns: int) -> PressureLevel | None:
        """The highest level whose deadline is still ahead of ``now_ns``."""
        return level_in_force(self.level_ends_ns, now_ns)


def level_in_force(level_ends_ns: tuple[int, int, int], now_ns: int) -> PressureLevel | None:
    """The highest level whose deadline (``level_ends_ns[level - 1]``) is ahead of ``now_ns``."""
    low, medium, critical = level_ends_ns
    if now_ns < critical:
        return PressureLevel.CRITICAL
    if now_ns < medium:
        return PressureLevel.MEDIUM
    if now_ns < low:
        return PressureLevel.LOW
    return None


NO_SQUEEZE = SqueezeDecision()


class SqueezePolicy:
    """Decides the squeeze at a report, and the pool target at a ring's loop pass.

    A base class, not a ``Protocol``: compiled, every loop pass's call for the target is then
    a direct call rather than a Python method lookup.
    """

    name: str
    #: Whether :meth:`decide` reads the device's pools (``facts``); the device counts them
    #: only for a policy that does, so the others cost nothing more at a report.
    reads_pools: bool

    def decide(
        self,
        current: SqueezeDecision,
        level: PressureLevel,
        now_ns: int,
        params: Params,
        facts: PoolFacts,
    ) -> SqueezeDecision:
        """The decision after a report at ``level`` to a device that follows ``current``.

        ``facts`` are the device's pools at the report when :attr:`reads_pools` is set (else
        an empty :class:`~blkback.core.autotune.PoolFacts`).
        """
        raise NotImplementedError

    def target(self, squeeze: SqueezeDecision, now_ns: int, last_io_ns: int, params: Params) -> int:
        """How many free pages a ring last busy at ``last_io_ns`` may keep at ``now_ns``."""
        raise NotImplementedError


def store_deadline(old_end_ns: int, now_ns: int, end_ns: int) -> int:
    """The deadline a report at ``now_ns`` stores: ``end_ns``, a plain store like the kernel's.

    Except when the new window is empty (``end_ns <= now_ns``) and the old one is already over:
    then the old deadline stays, so that a pass evaluated at an instant before the report
    (see "Stale instants" above) is not squeezed by a report that squeezes nothing. A report
    that ends a window still open (the duration lowered to 0 at runtime) ends it at ``now_ns``.
    """
    if end_ns <= now_ns and old_end_ns <= now_ns:
        return old_end_ns
    return end_ns


class KernelPolicy(SqueezePolicy):
    """Any report squeezes every ring of the device to 0 for the configured duration."""

    name = "kernel"
    reads_pools = False

    def decide(
        self,
        current: SqueezeDecision,
        level: PressureLevel,
        now_ns: int,
        params: Params,
        facts: PoolFacts,
    ) -> SqueezeDecision:
        end = now_ns + params.buffer_squeeze_duration_ms * NS_PER_MS
        # The constructor, not dataclasses.replace: a report reaches every device (~0.3 us).
        return SqueezeDecision(
            store_deadline(current.end_ns, now_ns, end), level, current.level_ends_ns, current.auto
        )

    def target(self, squeeze: SqueezeDecision, now_ns: int, last_io_ns: int, params: Params) -> int:
        if now_ns < squeeze.end_ns:
            return 0
        return params.max_buffer_pages


class GradedPolicy(SqueezePolicy):
    """The response grows with the pressure level and spares rings that are busy.

    Definition (pressure-signals.md A1). Each report at level L stores a deadline
    ``end[L] = now + buffer_squeeze_duration_ms`` (a plain store per level, like the kernel's
    single deadline). At a loop pass the ring's level is the highest L with ``now < end[L]``
    (strict, so a duration of 0 disables squeezing exactly as in the kernel), and with
    ``M = max_buffer_pages`` and a ring *idle* when it saw no I/O for ``idle_ns`` (1 s):

    ==========  ==============  ==============
    level       idle ring       active ring
    ==========  ==============  ==============
    none        M               M
    low         M // 2          M
    medium      0               M // 2
    critical    0               0
    ==========  ==============  ==============

    Why. Critical is the kernel's squeeze: give back everything. Below that, the pages of a
    ring that is serving I/O are its working set: freeing them only to fault them back in a
    few ms later is wasted reclaim (the ``refill_after_squeeze_pages`` counter), so an active
    ring keeps half at medium and all at low, while an idle ring, whose pages nobody will
    miss, gives back half at low and all at medium. Separate deadlines per level mean that a
    low report arriving during a critical window does not shorten the critical response,
    and the response falls back level by level as reports stop (the hysteresis of M4).

    State. The per-level deadlines travel in the decision (``level_ends_ns``), which the
    device stores where its scope says (so with ``squeeze_scope`` ``global`` every device
    shares one set, as the seed's single global deadline). The decision's ``end_ns`` is the
    latest deadline of any level and its ``level`` the level in force, so the device's
    counters and snapshot read the same as with the kernel policy.
    """

    name = "graded"
    reads_pools = False

    def __init__(self, idle_ns: int = NS_PER_S) -> None:
        self.idle_ns = idle_ns

    def decide(
        self,
        current: SqueezeDecision,
        level: PressureLevel,
        now_ns: int,
        params: Params,
        facts: PoolFacts,
    ) -> SqueezeDecision:
        ends = list(current.level_ends_ns)
        end = now_ns + params.buffer_squeeze_duration_ms * NS_PER_MS
        ends[level - 1] = store_deadline(ends[level - 1], now_ns, end)
        level_ends = (ends[0], ends[1], ends[2])
        return SqueezeDecision(
            max(level_ends), level_in_force(level_ends, now_ns), level_ends, current.auto
        )

    def target(self, squeeze: SqueezeDecision, now_ns: int, last_io_ns: int, params: Params) -> int:
        # The table above, level by level from the highest (as squeeze.level_at, unrolled:
        # this runs on every loop pass).
        low, medium, critical = squeeze.level_ends_ns
        full = params.max_buffer_pages
        if now_ns < critical:
            return 0
        if now_ns < medium:
            return 0 if now_ns - last_io_ns >= self.idle_ns else full // 2
        if now_ns < low:
            return full // 2 if now_ns - last_io_ns >= self.idle_ns else full
        return full


class AutoPolicy(SqueezePolicy):
    """The kernel's squeeze with a duration each device tunes for itself (``auto``).

    The target is the kernel policy's: 0 inside the window, ``max_buffer_pages`` outside.
    Only the window's length differs: at each report the device's
    :class:`~blkback.core.autotune.AutoState` (carried in the decision) judges the last
    window from the pools' facts and gives the duration of the next one; its control law is
    in :mod:`blkback.core.autotune`. Bounded by ``[1 ms, squeeze_ceiling_ms]``; the first
    window lasts ``buffer_squeeze_duration_ms`` (within those bounds).
    """

    name = "auto"
    reads_pools = True

    def decide(
        self,
        current: SqueezeDecision,
        level: PressureLevel,
        now_ns: int,
        params: Params,
        facts: PoolFacts,
    ) -> SqueezeDecision:
        ceiling = params.squeeze_ceiling_ms * NS_PER_MS
        state = current.auto
        if state is None:
            state = AutoState.starting(params.buffer_squeeze_duration_ms * NS_PER_MS, ceiling)
        state = state.after_report(now_ns, current.end_ns, facts, ceiling)
        return SqueezeDecision(now_ns + state.duration_ns, level, current.level_ends_ns, state)

    def target(self, squeeze: SqueezeDecision, now_ns: int, last_io_ns: int, params: Params) -> int:
        if now_ns < squeeze.end_ns:
            return 0
        return params.max_buffer_pages


POLICIES: dict[str, SqueezePolicy] = {
    "kernel": KernelPolicy(),
    "graded": GradedPolicy(),
    "auto": AutoPolicy(),
}


def policy_named(name: str) -> SqueezePolicy:
    """The policy registered under ``name``; falls back to the kernel's."""
    return POLICIES.get(name) or POLICIES["kernel"]
