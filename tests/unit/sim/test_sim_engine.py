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


def test_fixed_delay_events_run_in_the_order_of_the_heap() -> None:
    """``after_fixed`` (a FIFO merged with the heap) orders events exactly as ``after``."""
    import random

    def scenario(fixed: bool) -> list[tuple[int, int]]:
        loop = EventLoop()
        rng = random.Random(4)
        seen: list[tuple[int, int]] = []

        def cb(tag: int, now: int) -> None:
            seen.append((now, tag))
            if len(seen) > 3000:
                return
            # a tick every 5 (from many sources, the ties included), plus other delays
            if tag % 3 == 0:
                (loop.after_fixed if fixed else loop.after)(5, cb, tag)
            else:
                loop.after(rng.choice((0, 1, 5, 7)), cb, tag + 1)
            if rng.random() < 0.1:
                (loop.after_fixed if fixed else loop.after)(rng.choice((5, 3)), cb, 3 * tag)

        for tag in range(12):
            loop.at(rng.randrange(6), cb, tag)
        loop.run_until(40)
        loop.run_until(41)  # an end in between: the first event not due stays queued
        assert loop.pending()
        loop.run_until(10_000)
        return seen

    assert scenario(fixed=True) == scenario(fixed=False)
