"""``-v`` wherever it stands: before the command, after it, after its action."""

from __future__ import annotations

import pytest

from blkback.cli import build_parser, verbosity


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
