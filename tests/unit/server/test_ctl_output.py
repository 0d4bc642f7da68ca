"""``ctl``'s tables, from a real (unstarted) server's answers."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from blkback.core.counting import CountingAllocator
from blkback.core.policy import PressureLevel
from blkback.server.ctl_output import params_table, stats_view, to_text
from blkback.server.server import Server
from blkback.storage.null import NullStorage


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server([("vol", "null:1M", NullStorage(1 << 20))])
    try:
        yield srv
    finally:
        srv.stop()


def test_stats_show_pools_in_pages_and_bytes_and_explain_the_columns(server: Server) -> None:
    ring = server.bus.devices["vol"].add_ring(CountingAllocator(), server.clock.now_ns())
    ring.put_pages(ring.get_pages(256, server.clock.now_ns()))
    ring.stats.rd_req, ring.stats.oo_req, ring.stats.rd_bytes = 5, 2, 3 << 20

    text = to_text(stats_view(server.stats()))

    header, rule, row = text.splitlines()[2:5]
    assert header.split() == [
        "ring", "pool", "peak", "in", "flight", "alloc", "freed",
        "rd", "wr", "f", "ds", "oo", "err", "read", "written",
    ]  # fmt: skip
    assert set(rule.strip()) == {"─"}
    cells = row.split()
    assert cells[:5] == ["0", "256", "(1", "MiB)", "256"]
    assert "3 MiB" in row  # bytes read
    assert "device vol: not squeezed; 0 squeezes started by 0 pressure reports; 1 ring" in text
    for explained in ("rd, wr, f, ds: read, write", "oo: requests that found no free", "4096"):
        assert explained in text


def test_params_have_value_unit_default_and_meaning(server: Server) -> None:
    server.params.set("buffer_squeeze_duration_ms", 25)
    lines = to_text(params_table(server.params.as_dict()), width=400).splitlines()
    [line] = [x for x in lines if x.startswith("buffer_squeeze_duration_ms=25 ")]
    assert line.split()[1:3] == ["ms", "10"]  # unit, then the default
    assert "After memory pressure is reported" in line
    [line] = [x for x in lines if x.startswith("squeeze_scope=device ")]
    assert "device|global" in line


def test_a_squeezed_device_says_for_how_long(server: Server) -> None:
    server.params.set("buffer_squeeze_duration_ms", 60_000)
    server.report_pressure(PressureLevel.CRITICAL, "manual")
    text = to_text(stats_view(server.stats()))
    assert re.search(r"device vol: squeezed \(critical\) for [0-9,]+ ms more; 1 squeeze ", text)


def test_auto_state_and_lazy_pages_are_shown_where_reported(server: Server) -> None:
    server.bus.devices["vol"].add_ring(CountingAllocator(), server.clock.now_ns())
    stats = server.stats()
    stats["devices"][0]["auto"] = {"duration_ms": 25.0, "verdict": "lengthen", "reason": "why"}
    stats["devices"][0]["rings"][0]["pages_lazy"] = 512
    text = to_text(stats_view(stats))
    assert "; 1 ring; auto squeeze 25 ms (lengthen: why)" in text
    header, _rule, row = text.splitlines()[2:5]
    assert header.split()[7] == "lazy"
    assert "512 (2 MiB)" in row
    assert "lazy (where shown): freed pages the kernel may still hold" in text
