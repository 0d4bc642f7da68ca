"""The operator's log: rate limiting of error lines, and log_stats at INFO."""

from __future__ import annotations

import logging

import pytest

from blkback.clock import ManualClock
from blkback.server.oplog import RateLimit
from blkback.server.server import Server
from blkback.storage.null import NullStorage


def test_rate_limit_lets_a_burst_through_then_counts_what_it_drops() -> None:
    clock = ManualClock(start_ns=100_000_000_000)
    limit = RateLimit(burst=3, per_s=1.0, clock=clock)
    assert [limit.admit() for _ in range(5)] == [0, 0, 0, None, None]
    clock.advance_ms(1000)  # one token back
    assert limit.admit() == 2  # the line let through says two were dropped
    assert limit.admit() is None
    clock.advance_ms(60_000)  # a long quiet time refills the burst, no more
    assert [limit.admit() for _ in range(4)] == [1, 0, 0, None]


def test_log_stats_lines_are_info(caplog: pytest.LogCaptureFixture) -> None:
    server = Server([("vol", "null:1M", NullStorage(1 << 20))])
    try:
        with caplog.at_level(logging.INFO, logger="blkback"):
            server.bus.emit_stats("vol/0: rd 1 | wr 2")
    finally:
        server.stop()
    [record] = [r for r in caplog.records if "rd 1 | wr 2" in r.getMessage()]
    assert record.levelno == logging.INFO
