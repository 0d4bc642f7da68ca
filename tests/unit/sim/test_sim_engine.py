"""The event engine: time order, FIFO among equal times, no wall clock in the sim package."""

from __future__ import annotations

import ast
from pathlib import Path

from blkback.sim.engine import EventLoop

SIM = Path(__file__).resolve().parents[3] / "src" / "blkback" / "sim"


def test_events_run_in_time_then_schedule_order() -> None:
    loop = EventLoop(trace=True)
    seen: list[tuple[int, str]] = []

    def cb(arg: str, now: int) -> None:
        seen.append((now, arg))
        if arg == "a":
            loop.at(now, cb, "a-child")  # same time: after everything already queued there

    loop.at(20, cb, "c")
    loop.at(10, cb, "a")
    loop.at(10, cb, "b")
    loop.run_until(15)
    assert seen == [(10, "a"), (10, "b"), (10, "a-child")]
    assert loop.now == 15
    loop.run_until(100)
    assert seen[-1] == (20, "c")
    assert loop.events == 4
    assert loop.trace is not None
    assert len(loop.trace) == 4


def test_past_times_are_clamped_to_now() -> None:
    loop = EventLoop()
    loop.run_until(50)
    got: list[int] = []
    loop.at(10, lambda _a, now: got.append(now))
    loop.run_until(60)
    assert got == [50]


def test_sim_reads_no_wall_clock() -> None:
    """Only the CLI (progress bar, --profile) may import time."""
    offenders = {}
    for path in SIM.glob("*.py"):
        if path.name == "command.py":
            continue
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        bad = names & {"time", "datetime", "asyncio", "threading"}
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}
