"""The shrinker feed against a real server: one pressure report per move of the counter.

The counter is a plain file standing in for dom0's ``memory.failcnt`` (same format: one
integer), so no cgroup or root is needed; the server is a real ``blkback serve`` with its
pressure monitor off, so the feed's reports are the only ones it gets.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from blkback.repro.shrinkerfeed import WINDOWS_MS, ShrinkerFeed, gaps_within
from blkback.repro.testbed import ServerProcess


def _wait_for(predicate: object, timeout_s: float = 20.0) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_feed_reports_each_move_and_nothing_while_still(tmp_path: Path) -> None:
    counter = tmp_path / "failcnt"
    counter.write_text("100\n")
    server = ServerProcess(tmp_path, ["a=null:1G"], pressure="off", tag="srv")
    try:
        feed = ShrinkerFeed(str(counter), server.control)
        feed.start()
        try:
            assert _wait_for(lambda: feed.polls >= 20)
            assert feed.reports == 0  # the counter did not move: no reclaim, no report
            fd = os.open(counter, os.O_WRONLY)
            try:
                for value in (101, 150, 151):  # same width: one in-place write, never torn
                    os.pwrite(fd, f"{value}\n".encode(), 0)
                    assert _wait_for(lambda v=value: feed.failcnt == v - 100)
            finally:
                os.close(fd)
        finally:
            summary = feed.stop()
        assert summary["reports"] == 3 and summary["failcnt_delta"] == 51
        assert summary["errors"] == 0
        stats = server.stats()
        assert stats["pressure"]["events"] == {"manual:medium": 3}
    finally:
        server.stop()


def test_gaps_within_each_window() -> None:
    """The share of gaps between reports that a 1, 10 or 100 ms deadline bridges; a gap of
    exactly one window (10 ms) is not within it."""
    gaps_ns = [500_000, 2_000_000, 4_000_000, 50_000_000, 300_000_000]
    assert gaps_within(gaps_ns, WINDOWS_MS) == {"1": 0.2, "10": 0.6, "100": 0.8}
    assert gaps_within([10_000_000], (10,)) == {"10": 0.0}
    assert gaps_within([], WINDOWS_MS) == {"1": None, "10": None, "100": None}
