"""The operator's log: rate limiting of error lines, and log_stats at INFO."""

from __future__ import annotations

import logging

import pytest

from blkback.server.oplog import RateLimit
from blkback.server.server import Server
from blkback.storage.null import NullStorage


def _record(created: float, message: str = "write 0+4096 answered EPERM") -> logging.LogRecord:
    record = logging.LogRecord(
        "blkback.server.errors", logging.INFO, __file__, 1, message, None, None
    )
    record.created = created
    return record


def test_rate_limit_lets_a_burst_through_then_counts_what_it_drops() -> None:
    limit = RateLimit(burst=3, per_s=1.0)
    assert [limit.filter(_record(100.0)) for _ in range(5)] == [True, True, True, False, False]
    late = _record(101.0)  # one token back
    assert limit.filter(late)
    assert (
        late.getMessage() == "write 0+4096 answered EPERM (2 more error lines dropped before this)"
    )
    assert not limit.filter(_record(101.0))
    assert [limit.filter(_record(161.0)) for _ in range(4)] == [True, True, True, False]
    assert not limit.filter(_record(50.0))  # a clock stepping back refills nothing


def test_log_stats_lines_are_info(caplog: pytest.LogCaptureFixture) -> None:
    server = Server([("vol", "null:1M", NullStorage(1 << 20))])
    try:
        with caplog.at_level(logging.INFO, logger="blkback"):
            server.bus.emit_stats("vol/0: rd 1 | wr 2")
    finally:
        server.stop()
    [record] = [r for r in caplog.records if "rd 1 | wr 2" in r.getMessage()]
    assert record.levelno == logging.INFO
