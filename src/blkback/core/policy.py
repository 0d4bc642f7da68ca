"""Squeeze policies: what a pressure report does to devices, and each ring's pool target.

The kernel's policy (Linux 5.6+, blkback-spec §3): ``reclaim_memory`` sets
``squeeze_end = now + buffer_squeeze_duration_ms`` (a plain store, not a max), and every ring
loop pass shrinks the pool to 0 while ``now < squeeze_end`` and to ``max_buffer_pages``
otherwise. The level of the report is ignored: any pressure squeezes.

A policy is pure: it reads the device and ring state and the time it is given, and writes
only the device's squeeze state.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

from blkback.core.clock import NS_PER_MS

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


class KernelPolicy:
    """Any report squeezes every ring of the device to 0 for the configured duration."""

    name = "kernel"

    def on_reclaim(self, device: Device, level: PressureLevel, now_ns: int) -> None:
        device.set_squeeze_end(now_ns + device.params.buffer_squeeze_duration_ms * NS_PER_MS)
        device.squeeze_level = level

    def target(self, ring: Ring, now_ns: int) -> int:
        if now_ns < ring.device.squeeze_end_ns:
            return 0
        return ring.device.params.max_buffer_pages


POLICIES: dict[str, SqueezePolicy] = {"kernel": KernelPolicy()}


def policy_named(name: str) -> SqueezePolicy:
    """The policy registered under ``name``; falls back to the kernel's."""
    return POLICIES.get(name) or POLICIES["kernel"]
