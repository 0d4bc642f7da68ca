"""``-v`` wherever it stands: before the command, after it, after its action."""

from __future__ import annotations

import logging

import pytest

from blkback.cli import _warnings_unless_ours, build_parser, verbosity


@pytest.mark.parametrize(
    ("argv", "count"),
    [
        (["serve"], 0),
        (["-v", "serve"], 1),
        (["serve", "-v"], 1),
        (["serve", "-vv"], 2),
        (["-v", "serve", "-v"], 2),
        (["pressure", "watch", "-v"], 1),
        (["pressure", "-v", "watch", "-v"], 2),
        (["ctl", "stats", "-v", "--control", "/x"], 1),
        (["-vv", "sim", "run", "-v"], 3),
    ],
)
def test_verbosity_counts_every_v(argv: list[str], count: int) -> None:
    assert verbosity(build_parser().parse_args(argv)) == count


@pytest.mark.parametrize(
    ("logger", "level", "shown"),
    [
        ("blkback.server", logging.INFO, True),
        ("blkback.server", logging.DEBUG, True),  # blkback's level decides: -vv
        ("distributed.scheduler", logging.INFO, False),
        ("distributed.scheduler", logging.WARNING, True),
        ("blkbackish", logging.INFO, False),
    ],
)
def test_libraries_log_only_warnings(logger: str, level: int, shown: bool) -> None:
    record = logging.LogRecord(logger, level, __file__, 1, "message", None, None)
    assert _warnings_unless_ours(record) is shown
