"""Fuser: coalescing and fusion decisions, driven by a ManualClock (no sleeps)."""

from __future__ import annotations

from blkback.clock import NS_PER_MS, ManualClock
from blkback.core.policy import PressureLevel
from blkback.pressure.fusion import Fuser, FusionConfig

LOW, MEDIUM, CRITICAL = PressureLevel.LOW, PressureLevel.MEDIUM, PressureLevel.CRITICAL


def test_storm_is_coalesced_to_one_delivery_per_window() -> None:
    clock = ManualClock()
    fuser = Fuser()
    delivered = 0
    for _ in range(100):  # 100 events 10 us apart: 1 ms in all
        if fuser.observe("vmpressure", MEDIUM, clock.now_ns()).deliver:
            delivered += 1
        clock.advance_ns(10_000)
    assert delivered == 1
    assert fuser.coalesced == 99
    assert fuser.observe("vmpressure", MEDIUM, clock.now_ns()).deliver  # window over


def test_higher_level_is_never_suppressed() -> None:
    clock = ManualClock()
    fuser = Fuser()
    assert fuser.observe("vmpressure", LOW, 0).reason == "delivered"
    assert fuser.observe("vmpressure", LOW, 100).reason == "coalesced"
    assert fuser.observe("vmpressure", CRITICAL, 200).reason == "delivered"
    assert fuser.observe("vmpressure", MEDIUM, 300).reason == "coalesced"
    assert fuser.delivered == {"low": 1, "medium": 0, "critical": 1}
    assert clock.now_ns() == 0


def test_window_is_configurable() -> None:
    fuser = Fuser(FusionConfig(coalesce_ns=10 * NS_PER_MS))
    assert fuser.observe("manual", LOW, 0).deliver
    assert not fuser.observe("manual", LOW, 9 * NS_PER_MS).deliver
    assert fuser.observe("manual", LOW, 10 * NS_PER_MS).deliver


def test_psi_severity_raises_the_level() -> None:
    fuser = Fuser()
    assert fuser.observe("psi-total", CRITICAL, 0).level == CRITICAL
    d = fuser.observe("vmpressure", LOW, 5 * NS_PER_MS)
    assert d.deliver
    assert d.level == CRITICAL  # vmpressure's onset, PSI's severity


def test_psi_severity_never_lowers() -> None:
    fuser = Fuser()
    fuser.observe("psi-total", LOW, 0)
    assert fuser.observe("vmpressure", CRITICAL, 5 * NS_PER_MS).level == CRITICAL


def test_stale_severity_is_ignored() -> None:
    fuser = Fuser()
    fuser.observe("psi-total", CRITICAL, 0)
    assert fuser.observe("vmpressure", LOW, 300 * NS_PER_MS).level == LOW


def test_low_vmpressure_needs_confirmation_when_psi_sees_no_stall() -> None:
    fuser = Fuser()
    assert fuser.observe("psi-total", None, 0).reason == "sample"
    assert fuser.observe("vmpressure", LOW, NS_PER_MS).reason == "unconfirmed"
    assert fuser.unconfirmed == 1
    # medium and up are trusted for onset; manual reports are trusted at any level
    assert fuser.observe("vmpressure", MEDIUM, 2 * NS_PER_MS).deliver
    assert fuser.observe("manual", LOW, 10 * NS_PER_MS, trusted=True).deliver


def test_low_vmpressure_passes_without_psi() -> None:
    fuser = Fuser()
    assert fuser.observe("vmpressure", LOW, 0).deliver


def test_samples_without_pressure_are_not_delivered() -> None:
    fuser = Fuser()
    d = fuser.observe("psi-total", None, 0)
    assert not d.deliver
    assert fuser.severity(0) == (True, None)
    assert fuser.severity(NS_PER_MS * 1000) == (False, None)


def test_highest_fresh_severity_of_several_sources() -> None:
    fuser = Fuser()
    fuser.observe("psi-total", LOW, 0)
    fuser.observe("psi-total-cgroup", CRITICAL, 0)
    assert fuser.severity(1) == (True, CRITICAL)
