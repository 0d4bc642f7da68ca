"""``pressure probe``/``watch`` and ``ctl pressure --status`` as text: words, not reprs."""

from __future__ import annotations

import argparse
import re

import pytest

from blkback.core.policy import PressureLevel
from blkback.pressure import command
from blkback.pressure.display import event_line, monitor_status_lines, probe_table
from blkback.pressure.monitor import PressureMonitor
from blkback.pressure.probe import SourceStatus
from blkback.server.ctl_output import to_text


def test_status_lines_of_a_real_monitor() -> None:
    delivered: list[tuple[PressureLevel, str]] = []
    monitor = PressureMonitor(
        lambda level, source: delivered.append((level, source)),
        mode="manual",
        coalesce_ms=60_000,  # the second report is coalesced however slow the host
    )
    monitor.start()
    try:
        monitor.report(PressureLevel.MEDIUM)
        monitor.report(PressureLevel.MEDIUM)  # within the window: coalesced
        lines = monitor_status_lines(monitor.status())
    finally:
        monitor.stop()
    assert delivered == [(PressureLevel.MEDIUM, "manual")]
    assert lines[0] == (
        "pressure monitor: mode manual, running; "
        "pressure now: unknown (no recent sample from a polled source)"
    )
    assert "  manual: reports by hand (ctl pressure)" in lines
    assert "  manual: low 0, medium 2, critical 0" in lines
    assert any(x.startswith("delivered to the devices: low 0, medium 1, critical 0; coalesced 1")
               for x in lines)  # fmt: skip
    assert any(re.fullmatch(r"last delivery: medium from manual, \d+\.\d s ago", x) for x in lines)
    assert not any("{" in x or "b'" in x for x in lines)


def test_event_line_says_what_happened() -> None:
    line = event_line(1.5, "psi-trigger", "medium", 3, "delivered", "critical")
    assert line.split() == [
        "1.500", "s", "psi-trigger", "medium", "x3", "delivered", "to", "the", "devices", "as",
        "critical",
    ]  # fmt: skip


def test_probe_text_has_no_bytes_repr(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    command.run(parser.parse_args(["probe"]))
    out = capsys.readouterr().out
    assert "psi-trigger" in out
    assert "b'" not in out and "\\x00" not in out


def test_probe_table_shows_details_verbatim() -> None:
    """Details with [brackets] (IPv6, paths) are text, not rich markup."""
    statuses = [SourceStatus("vmpressure", False, "no [bold]memory[/] cgroup at [::1]")]
    text = to_text(probe_table("cgroup layout v2", statuses))
    assert text.splitlines()[0] == "cgroup layout v2"
    assert "vmpressure   no      no [bold]memory[/] cgroup at [::1]" in text
