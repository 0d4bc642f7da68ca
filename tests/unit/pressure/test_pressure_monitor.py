"""Sources, the poll thread, the monitor, the probe and the CLI (real files where possible)."""

from __future__ import annotations

import argparse
import json
import os
import threading
from pathlib import Path

import pytest

from blkback.clock import NS_PER_MS, ManualClock
from blkback.core.policy import PressureLevel
from blkback.errors import ConfigError, EnvironmentProblem
from blkback.pressure import command
from blkback.pressure.cgroups import CgroupLayout, read_layout
from blkback.pressure.monitor import SOURCE_NAMES, PressureMonitor, parse_mode
from blkback.pressure.probe import probe
from blkback.pressure.sources import (
    MemAvailableSource,
    Poller,
    PsiTotalSource,
    PsiTriggerSource,
    Source,
    SourceEvent,
    VmpressureSource,
)

PSI = "/proc/pressure/memory"


def psi_text(some: int, full: int) -> str:
    return (
        f"some avg10=0.00 avg60=0.00 avg300=0.00 total={some}\n"
        f"full avg10=0.00 avg60=0.00 avg300=0.00 total={full}\n"
    )


def test_psi_total_source_grades_each_period(tmp_path: Path) -> None:
    path = tmp_path / "memory.pressure"
    path.write_text(psi_text(0, 0))
    events: list[SourceEvent] = []
    src = PsiTotalSource(str(path), "psi-total", period_ns=50 * NS_PER_MS)
    src.open(0, events.append)
    try:
        path.write_text(psi_text(5_000, 0))  # 5 ms of 50 ms: medium
        src.tick(50 * NS_PER_MS)
        path.write_text(psi_text(5_000, 0))  # nothing new: a sample without level
        src.tick(100 * NS_PER_MS)
        path.write_text(psi_text(30_000, 10_000))  # full 20 %: critical
        src.tick(150 * NS_PER_MS)
    finally:
        src.close()
    assert [e.level for e in events] == [PressureLevel.MEDIUM, None, PressureLevel.CRITICAL]
    assert all(e.severity for e in events)
    assert events[0].some == pytest.approx(0.1)


def open_quiet_psi_total(
    tmp_path: Path, quiet_after_ms: int
) -> tuple[Path, list[SourceEvent], PsiTotalSource]:
    """A PSI-totals source on a file with no stall yet: 50 ms periods, 250 ms when quiet."""
    path = tmp_path / "memory.pressure"
    path.write_text(psi_text(0, 0))
    events: list[SourceEvent] = []
    src = PsiTotalSource(
        str(path),
        period_ns=50 * NS_PER_MS,
        quiet_period_ns=250 * NS_PER_MS,
        quiet_after_ns=quiet_after_ms * NS_PER_MS,
    )
    src.open(0, events.append)
    return path, events, src


def test_psi_total_source_samples_slower_while_nothing_stalls(tmp_path: Path) -> None:
    path, events, src = open_quiet_psi_total(tmp_path, quiet_after_ms=1000)
    ms = NS_PER_MS
    periods: list[int] = []
    try:
        for t in range(50, 1050, 50):  # 1 s of samples that see no stall
            src.tick(t * ms)
            periods.append(src.period_ns)
        path.write_text(psi_text(5_000, 0))  # a stall: back to 50 ms at once
        src.tick(1250 * ms)  # one quiet period after the last sample
        periods.append(src.period_ns)
        src.tick(1300 * ms)  # no new stall, but not yet 1 s since the last one
        periods.append(src.period_ns)
        src.tick(2300 * ms)
        periods.append(src.period_ns)
    finally:
        src.close()
    assert periods[:19] == [50 * ms] * 19  # 950 ms without stall: still fast
    assert periods[19] == 250 * ms  # 1 s without stall: quiet
    assert periods[20:] == [50 * ms, 50 * ms, 250 * ms]
    # The stall sample measured its own (longer) period: 5 ms of 250 ms.
    assert events[20].some == pytest.approx(0.02)
    assert events[20].level == PressureLevel.LOW


def test_psi_total_source_refreshes_only_when_quiet_and_stale(tmp_path: Path) -> None:
    path, events, src = open_quiet_psi_total(tmp_path, quiet_after_ms=100)
    ms = NS_PER_MS
    try:
        assert not src.refresh(60 * ms)  # sampling every 50 ms: nothing to refresh
        src.tick(50 * ms)
        src.tick(100 * ms)
        assert src.period_ns == 250 * ms  # quiet
        assert not src.refresh(140 * ms)  # the last sample is 40 ms old: fresh enough
        assert len(events) == 2
        path.write_text(psi_text(20_000, 0))
        assert src.refresh(200 * ms)  # 100 ms old: sample now
        assert len(events) == 3
        assert events[-1].now_ns == 200 * ms
        assert events[-1].level == PressureLevel.MEDIUM  # 20 ms of 100 ms
        assert src.period_ns == 50 * ms  # the stall makes it fast again
    finally:
        src.close()


def test_psi_total_source_rejects_bad_periods(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="periods"):
        PsiTotalSource(str(tmp_path / "x"), period_ns=0)
    with pytest.raises(ValueError, match="periods"):
        PsiTotalSource(str(tmp_path / "x"), quiet_period_ns=-1)


def test_psi_total_source_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem, match="No such file"):
        PsiTotalSource(str(tmp_path / "nope")).open(0, lambda e: None)


def test_meminfo_source_emits_below_threshold(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text("MemTotal: 1000 kB\nMemAvailable: 40 kB\n")
    events: list[SourceEvent] = []
    src = MemAvailableSource(meminfo_path=str(path))
    src.open(0, events.append)
    src.tick(1)
    path.write_text("MemTotal: 1000 kB\nMemAvailable: 900 kB\n")
    src.tick(2)
    assert [e.level for e in events] == [PressureLevel.CRITICAL]


def test_real_psi_trigger_arms() -> None:
    if not os.path.exists(PSI):
        pytest.skip("kernel without PSI")
    src = PsiTriggerSource(PSI)
    try:
        src.open(0, lambda e: None)
    except EnvironmentProblem as exc:
        pytest.skip(f"PSI triggers refused here: {exc}")
    try:
        assert src.form in ("privileged", "unprivileged")
        assert len(src.fds()) == 3
    finally:
        src.close()
    assert src.fds() == []


def test_real_vmpressure_registers() -> None:
    mem = read_layout().v1_dir("memory")
    if mem is None or not os.path.exists(os.path.join(mem, "memory.pressure_level")):
        pytest.skip("no cgroup v1 memory controller here")
    src = VmpressureSource(mem)
    try:
        src.open(0, lambda e: None)
    except EnvironmentProblem as exc:
        pytest.skip(str(exc))
    try:
        assert len(src.fds()) == 3
    finally:
        src.close()


def test_vmpressure_on_missing_cgroup(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem, match="cannot register vmpressure"):
        VmpressureSource(str(tmp_path)).open(0, lambda e: None)


class Breaking(Source):
    name = "breaking"
    period_ns = 1_000_000

    def tick(self, now_ns: int) -> None:
        raise OSError("gone")


class EventfdSource(Source):
    """A source on an eventfd the test writes to: exercises the poll path."""

    name = "efd"

    def open(self, now_ns: int, emit: object) -> None:
        super().open(now_ns, emit)  # type: ignore[arg-type]
        self.fd = os.eventfd(0, os.EFD_NONBLOCK)

    def fds(self) -> list[tuple[int, int]]:
        import select

        return [(self.fd, select.POLLIN)]

    def handle(self, ready: dict[int, int], now_ns: int) -> None:
        n = os.eventfd_read(self.fd)
        self._emit(SourceEvent(self.name, PressureLevel.MEDIUM, now_ns, count=n))

    def close(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None  # type: ignore[assignment]


def test_poller_reports_failures_and_runs_fd_sources() -> None:
    failed = threading.Event()
    got = threading.Event()
    reasons: dict[str, str] = {}
    events: list[SourceEvent] = []

    def on_failure(name: str, why: str) -> None:
        reasons[name] = why
        failed.set()

    def emit(event: SourceEvent) -> None:
        events.append(event)
        got.set()

    efd = EventfdSource()
    poller = Poller([Breaking(), efd], emit, on_failure=on_failure)
    assert poller.start() == {}
    try:
        assert failed.wait(5)
        assert "gone" in reasons["breaking"]
        os.eventfd_write(efd.fd, 3)
        assert got.wait(5)
        assert events[0].count == 3
    finally:
        poller.stop()
    assert poller.running == []


def test_poller_samples_a_quiet_psi_total_before_other_events(tmp_path: Path) -> None:
    """A quiet PSI-totals source samples first when another source reports, so the fusion
    grades and confirms that event on a fresh sample."""
    path = tmp_path / "memory.pressure"
    path.write_text(psi_text(0, 0))
    hour = 3600 * 1000 * NS_PER_MS
    psi = PsiTotalSource(
        str(path), period_ns=20 * NS_PER_MS, quiet_period_ns=hour, quiet_after_ns=0
    )
    efd = EventfdSource()
    events: list[SourceEvent] = []
    first = threading.Event()
    got = threading.Event()

    def emit(event: SourceEvent) -> None:
        events.append(event)
        first.set()
        if event.source == efd.name:
            got.set()

    clock = ManualClock()
    poller = Poller([psi, efd], emit, clock=clock)
    assert poller.start() == {}
    try:
        clock.advance_ns(20 * NS_PER_MS)
        assert first.wait(5)  # the first sample: no stall, quiet for an hour from now
        assert psi.period_ns == hour
        clock.advance_ns(30 * NS_PER_MS)  # the last sample is older than the fast period
        path.write_text(psi_text(30_000, 0))
        os.eventfd_write(efd.fd, 1)
        assert got.wait(5)
    finally:
        poller.stop()
    assert [e.source for e in events] == ["psi-total", "psi-total", "efd"]
    assert events[1].level is not None  # the refresh saw the stall...
    assert psi.period_ns == 20 * NS_PER_MS  # ...and sampling is fast again


class OnsetSource(EventfdSource):
    """An event-driven source, as PSI triggers and vmpressure are: the kernel wakes us."""

    name = "onset"
    reports_onset = True


@pytest.mark.parametrize("onset", [True, False], ids=["onset-source", "no-onset-source"])
def test_poller_parks_a_quiet_psi_total_only_while_an_onset_source_runs(
    tmp_path: Path, onset: bool
) -> None:
    """With ``park_quiet``, a quiet PSI-totals source stops sampling while a source the kernel
    wakes us for runs; that source's event makes it sample, and a stall unparks it."""
    path = tmp_path / "memory.pressure"
    path.write_text(psi_text(0, 0))
    hour = 3600 * 1000 * NS_PER_MS
    psi = PsiTotalSource(
        str(path), period_ns=20 * NS_PER_MS, quiet_period_ns=hour, quiet_after_ns=0
    )
    other = OnsetSource() if onset else EventfdSource()
    events: list[SourceEvent] = []
    parked_at_refresh: set[Source] = set()
    first = threading.Event()
    got = threading.Event()
    clock = ManualClock()

    def emit(event: SourceEvent) -> None:
        events.append(event)
        if len(events) == 2:  # the refresh before the other source's event
            parked_at_refresh.update(poller.parked)
        first.set()
        if event.source == other.name:
            got.set()

    poller = Poller([psi, other], emit, clock=clock, park_quiet=True)
    assert poller.start() == {}
    try:
        clock.advance_ns(20 * NS_PER_MS)
        assert first.wait(5)  # the first sample: no stall, quiet at once
        clock.advance_ns(30 * NS_PER_MS)
        path.write_text(psi_text(30_000, 0))
        os.eventfd_write(other.fd, 1)
        assert got.wait(5)
    finally:
        poller.stop()
    assert [e.source for e in events] == ["psi-total", "psi-total", other.name]
    assert parked_at_refresh == ({psi} if onset else set())
    assert events[1].level is not None  # the refresh saw the stall...
    assert psi not in poller.parked  # ...and sampling goes on at its period
    assert psi.period_ns == 20 * NS_PER_MS


def test_standalone_source_start_stop() -> None:
    got = threading.Event()
    levels: list[tuple[PressureLevel, str]] = []
    src = EventfdSource()

    def cb(level: PressureLevel, name: str) -> None:
        levels.append((level, name))
        got.set()

    src.start(cb)
    try:
        os.eventfd_write(src.fd, 1)
        assert got.wait(5)
    finally:
        src.stop()
    assert levels == [(PressureLevel.MEDIUM, "efd")]


def test_parse_mode() -> None:
    assert parse_mode("auto") is None
    assert parse_mode("vmpressure, psi-total") == ("vmpressure", "psi-total")
    with pytest.raises(ConfigError, match="unknown pressure source"):
        parse_mode("psi,bogus")
    with pytest.raises(ConfigError):
        parse_mode(" , ")


def test_manual_reports_are_coalesced_and_counted() -> None:
    clock = ManualClock(1)
    got: list[tuple[PressureLevel, str]] = []
    monitor = PressureMonitor(lambda lv, src: got.append((lv, src)), mode="manual", clock=clock)
    with monitor:
        assert monitor.report(PressureLevel.LOW).deliver
        assert not monitor.report(PressureLevel.LOW).deliver  # same ns: coalesced
        assert monitor.report(PressureLevel.CRITICAL, "ctl").deliver  # higher: passes
        clock.advance_ms(1)
        assert monitor.report(PressureLevel.LOW).deliver
        status = monitor.status()
    assert got == [
        (PressureLevel.LOW, "manual"),
        (PressureLevel.CRITICAL, "ctl"),
        (PressureLevel.LOW, "manual"),
    ]
    json.dumps(status)
    assert status["active"] == ["manual"]
    assert status["coalesced"] == 1
    assert status["events"] == {
        "manual": {"low": 3, "medium": 0, "critical": 0},
        "ctl": {"low": 0, "medium": 0, "critical": 1},
    }
    assert status["delivered"] == {"low": 2, "medium": 0, "critical": 1}
    assert not monitor.running


def test_deliver_errors_do_not_kill_the_monitor() -> None:
    def boom(level: PressureLevel, source: str) -> None:
        raise RuntimeError("server gone")

    monitor = PressureMonitor(boom, mode="manual", clock=ManualClock())
    with monitor:
        monitor.report(PressureLevel.LOW)
        assert monitor.status()["deliver_errors"] == 1


def test_explicit_source_that_fails_is_an_error() -> None:
    empty = CgroupLayout((), {}, None)
    monitor = PressureMonitor(lambda lv, s: None, mode="vmpressure", layout=empty)
    with pytest.raises(EnvironmentProblem, match="vmpressure: no cgroup v1 memory"):
        monitor.start()
    assert not monitor.running


def test_auto_mode_starts_what_works() -> None:
    monitor = PressureMonitor(lambda lv, s: None)
    with monitor:
        status = monitor.status()
    json.dumps(status)
    active = status["active"]
    assert isinstance(active, list)
    failed = status["failed"]
    assert isinstance(failed, dict)
    assert "manual" in active
    # every source is either active, failed with a reason, or skipped with a reason
    skipped = status["skipped"]
    assert isinstance(skipped, dict)
    for name in SOURCE_NAMES:
        assert name in active or failed.get(name) or skipped.get(name), name


def test_auto_falls_back_to_meminfo_when_nothing_else_works() -> None:
    empty = CgroupLayout((), {}, None)
    monitor = PressureMonitor(lambda lv, s: None, layout=empty)
    monitor.start()
    try:
        active = monitor.active_sources()
        if os.path.exists(PSI):
            assert "psi-total" in active  # global PSI needs no cgroup
        else:
            assert active == ["meminfo", "manual"]
    finally:
        monitor.stop()


def test_probe_explains_every_source() -> None:
    statuses = probe()
    assert [s.name for s in statuses] == list(SOURCE_NAMES)
    assert all(s.detail for s in statuses)
    manual = statuses[-1]
    assert manual.works
    json.dumps([s.as_dict() for s in statuses])
    trig = statuses[0]
    if trig.works:
        assert "CAP_SYS_RESOURCE" in trig.detail


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


def test_cli_probe_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(["probe", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert {s["name"] for s in out["sources"]} == set(SOURCE_NAMES)
    assert code in (0, 1)


def test_cli_watch_stops_after_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["watch", "--seconds", "0.2", "--mode", "manual"]) == 0
    assert "watching: active manual" in capsys.readouterr().err
