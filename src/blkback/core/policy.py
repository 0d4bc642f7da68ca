"""Squeeze policies: what a pressure report does to devices, and each ring's pool target.

The kernel's policy (Linux 5.6+, blkback-spec §3): ``reclaim_memory`` sets
``squeeze_end = now + buffer_squeeze_duration_ms`` (a plain store, not a max), and every ring
loop pass shrinks the pool to 0 while ``now < squeeze_end`` and to ``max_buffer_pages``
otherwise. The level of the report is ignored: any pressure squeezes.

A policy is pure: it reads the device and ring state and the time it is given, and writes
only the device's squeeze state.

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
import weakref
from typing import TYPE_CHECKING, Protocol

from blkback.core.autotune import AutoPolicy
from blkback.core.clock import NS_PER_MS, NS_PER_S

if TYPE_CHECKING:
    from blkback.core.device import Device
    from blkback.core.ring import Ring


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


class SqueezePolicy(Protocol):
    """Decides the squeeze state on reports and the pool target on loop passes."""

    name: str

    def on_reclaim(self, device: Device, level: PressureLevel, now_ns: int) -> None:
        """A pressure report reached ``device`` (the ``reclaim_memory`` callback)."""
        ...

    def target(self, ring: Ring, now_ns: int) -> int:
        """How many free pages ``ring`` may keep after its loop pass at ``now_ns``."""
        ...


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


class KernelPolicy:
    """Any report squeezes every ring of the device to 0 for the configured duration."""

    name = "kernel"

    def on_reclaim(self, device: Device, level: PressureLevel, now_ns: int) -> None:
        end = now_ns + device.params.buffer_squeeze_duration_ms * NS_PER_MS
        device.set_squeeze_end(store_deadline(device.squeeze_end_ns, now_ns, end))
        device.squeeze_level = level

    def target(self, ring: Ring, now_ns: int) -> int:
        if now_ns < ring.device.squeeze_end_ns:
            return 0
        return ring.device.params.max_buffer_pages


class GradedPolicy:
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

    State. The per-level deadlines live in this policy, keyed weakly by the device (or by
    the bus when ``squeeze_scope`` is ``global``, so that every device shares one set, as
    the seed's single global deadline). The device still gets ``set_squeeze_end`` (the
    latest deadline of any level) and ``squeeze_level`` (the level in force), so its
    counters and snapshot read the same as with the kernel policy.
    """

    name = "graded"

    def __init__(self, idle_ns: int = NS_PER_S) -> None:
        self.idle_ns = idle_ns
        self._ends: weakref.WeakKeyDictionary[object, dict[PressureLevel, int]] = (
            weakref.WeakKeyDictionary()
        )

    @staticmethod
    def _key(device: Device) -> object:
        return device.bus if device.params.squeeze_scope == "global" else device

    def level_at(self, device: Device, now_ns: int) -> PressureLevel | None:
        """The highest level whose deadline is still ahead of ``now_ns`` for ``device``."""
        ends = self._ends.get(self._key(device))
        if not ends:
            return None
        # A copy: a reporter thread may add a level while a ring thread's pass reads them.
        active = [level for level, end in tuple(ends.items()) if now_ns < end]
        return max(active) if active else None

    def on_reclaim(self, device: Device, level: PressureLevel, now_ns: int) -> None:
        key = self._key(device)
        ends = self._ends.get(key)
        if ends is None:
            ends = {}
            self._ends[key] = ends
        end = now_ns + device.params.buffer_squeeze_duration_ms * NS_PER_MS
        ends[level] = store_deadline(ends.get(level, 0), now_ns, end)
        device.set_squeeze_end(max(ends.values()))
        device.squeeze_level = self.level_at(device, now_ns)

    def target(self, ring: Ring, now_ns: int) -> int:
        device = ring.device
        full = device.params.max_buffer_pages
        level = self.level_at(device, now_ns)
        if level is None:
            return full
        if level >= PressureLevel.CRITICAL:
            return 0
        idle = now_ns - ring.last_io_ns >= self.idle_ns
        if level == PressureLevel.MEDIUM:
            return 0 if idle else full // 2
        return full // 2 if idle else full


POLICIES: dict[str, SqueezePolicy] = {
    "kernel": KernelPolicy(),
    "graded": GradedPolicy(),
    "auto": AutoPolicy(),
}


def policy_named(name: str) -> SqueezePolicy:
    """The policy registered under ``name``; falls back to the kernel's."""
    return POLICIES.get(name) or POLICIES["kernel"]
