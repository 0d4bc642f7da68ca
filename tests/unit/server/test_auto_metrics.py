"""squeeze_policy=auto's state in a real (unstarted) server's scrape, on a manual clock."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from blkback.clock import NS_PER_MS, ManualClock
from blkback.core.counting import CountingAllocator
from blkback.core.params import Params
from blkback.core.policy import PressureLevel
from blkback.server.metrics import registry_for
from blkback.server.server import Server
from blkback.storage.null import NullStorage


def _samples(server: Server) -> dict[str, float]:
    text = generate_latest(registry_for(server)).decode()
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.labels.get("device") == "vol"
    }


def test_auto_duration_and_its_changes_are_exported() -> None:
    clock = ManualClock(1_000 * NS_PER_MS)
    server = Server(
        [("vol", "null:1M", NullStorage(1 << 20))],
        params=Params(squeeze_policy="auto"),
        clock=clock,
    )
    try:
        ring = server.bus.devices["vol"].add_ring(CountingAllocator(), clock.now_ns())
        assert "blkback_auto_squeeze_duration_seconds" not in _samples(server)  # before any report
        server.report_pressure(PressureLevel.CRITICAL, "manual")
        ring.loop_pass(clock.now_ns(), had_io=False)
        clock.advance_ms(12)  # 2 ms after the 10 ms window closed, the pool has pages again
        ring.put_pages(ring.get_pages(16, clock.now_ns()))
        server.report_pressure(PressureLevel.CRITICAL, "manual")
        samples = _samples(server)
        assert samples["blkback_auto_squeeze_duration_seconds"] == 0.02
        assert samples["blkback_auto_lengthened_total"] == 1
        assert samples["blkback_auto_shortened_total"] == 0
    finally:
        server.stop()
