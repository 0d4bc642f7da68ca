"""The Prometheus exposition of a real (unstarted) server's stats, read back by the library's
own parser: names and types, the process collector, and new snapshot fields flowing through."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from blkback.core.counting import CountingAllocator
from blkback.core.policy import PressureLevel
from blkback.server.metrics import families, registry_for
from blkback.server.server import Server
from blkback.storage.null import NullStorage


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server([("vol", "null:1M", NullStorage(1 << 20))])
    try:
        yield srv
    finally:
        srv.stop()


def _parse(text: str) -> dict[str, tuple[str, list[Sample]]]:
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def _value(samples: list[Sample], metric: str, /, **labels: str) -> float:
    found = [s.value for s in samples if s.name == metric and s.labels == labels]
    assert len(found) == 1, (metric, labels, samples)
    return found[0]


def test_scrape_has_blkback_series_and_process_metrics(server: Server) -> None:
    device = server.bus.devices["vol"]
    ring = device.add_ring(CountingAllocator(), server.clock.now_ns())
    pages = ring.get_pages(8, server.clock.now_ns())
    ring.put_pages(pages)
    ring.stats.rd_req += 3
    ring.stats.errors += 1
    server.report_pressure(PressureLevel.CRITICAL, "manual")

    parsed = _parse(generate_latest(registry_for(server)).decode())

    kind, samples = parsed["blkback_pool_pages"]
    assert kind == "gauge"
    assert _value(samples, "blkback_pool_pages", device="vol", ring="0") == len(ring.pool)
    kind, samples = parsed["blkback_pages_allocated"]
    assert kind == "counter"
    assert _value(samples, "blkback_pages_allocated_total", device="vol", ring="0") == 8
    _, samples = parsed["blkback_requests"]
    assert _value(samples, "blkback_requests_total", device="vol", ring="0", kind="read") == 3
    _, samples = parsed["blkback_request_errors"]
    assert _value(samples, "blkback_request_errors_total", device="vol", ring="0") == 1
    _, samples = parsed["blkback_squeezes"]
    assert _value(samples, "blkback_squeezes_total", device="vol") == 1
    _, samples = parsed["blkback_pressure_events"]
    assert _value(samples, "blkback_pressure_events_total", source="manual", level="critical") == 1
    _, samples = parsed["blkback_param"]
    assert _value(samples, "blkback_param", name="max_buffer_pages") == 1024
    _, samples = parsed["blkback_param_choice"]
    assert _value(samples, "blkback_param_choice", name="squeeze_policy", value="kernel") == 1
    # The process collector, as every exporter has it.
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"):
        assert name in parsed, sorted(parsed)
    _, samples = parsed["process_resident_memory_bytes"]
    assert _value(samples, "process_resident_memory_bytes") > 0


def test_new_snapshot_fields_flow_through_without_code(server: Server) -> None:
    """A counter another module adds to RingStats.extra, and a number it adds to a device
    snapshot, are exported under the naming rule with the right type."""
    device = server.bus.devices["vol"]
    ring = device.add_ring(CountingAllocator(), server.clock.now_ns())
    ring.stats.extra["pages_lazily_freed"] = 7
    stats = server.stats()
    stats["devices"][0]["tuned_window_ms"] = 25
    stats["devices"][0]["rings"][0]["pages_in_limbo"] = 5

    parsed = _parse(_exposition(stats))

    kind, samples = parsed["blkback_ring_pages_lazily_freed"]
    assert kind == "counter"
    assert _value(samples, "blkback_ring_pages_lazily_freed_total", device="vol", ring="0") == 7
    kind, samples = parsed["blkback_device_tuned_window_ms"]
    assert kind == "gauge"
    assert _value(samples, "blkback_device_tuned_window_ms", device="vol") == 25
    kind, samples = parsed["blkback_ring_pages_in_limbo"]
    assert kind == "gauge"
    assert _value(samples, "blkback_ring_pages_in_limbo", device="vol", ring="0") == 5
    # Strings and timestamps on the server's own clock are not exported.
    assert not any("verdict" in name for name in parsed)
    assert not any("squeeze_end" in name or "last_pass" in name for name in parsed)


class _FixedStats(Collector):
    def __init__(self, stats: dict[str, Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        return list(families(self.stats))


def _exposition(stats: dict[str, Any]) -> str:
    """The text exposition of a stats dict, through a registry as a scrape would make it."""
    registry = CollectorRegistry()
    registry.register(_FixedStats(stats))
    return generate_latest(registry).decode()


def test_fields_other_issues_add_get_their_names_types_and_units(server: Server) -> None:
    """Issue 12's release counts on a ring and issue 14's auto state (a nested dict) on a
    device, in the shapes those branches report them."""
    device = server.bus.devices["vol"]
    device.add_ring(CountingAllocator(), server.clock.now_ns())
    stats = server.stats()
    ring = stats["devices"][0]["rings"][0]
    ring.update(pages_held=40, pages_lazy=3, pages_lazily_freed=9, pages_returned=11)
    stats["devices"][0]["auto"] = {
        "duration_ms": 25.0,
        "verdict": "lengthen",
        "reason": "pressure came back",
        "lengthened": 2,
        "shortened": 0,
    }

    parsed = _parse(_exposition(stats))

    assert parsed["blkback_pages_held"][0] == "gauge"
    assert (
        _value(parsed["blkback_pages_held"][1], "blkback_pages_held", device="vol", ring="0") == 40
    )
    kind, samples = parsed["blkback_pages_lazily_freed"]
    assert kind == "counter"
    assert _value(samples, "blkback_pages_lazily_freed_total", device="vol", ring="0") == 9
    kind, samples = parsed["blkback_auto_squeeze_duration_seconds"]
    assert kind == "gauge"
    assert _value(samples, "blkback_auto_squeeze_duration_seconds", device="vol") == 0.025
    kind, samples = parsed["blkback_auto_lengthened"]
    assert kind == "counter"
    assert _value(samples, "blkback_auto_lengthened_total", device="vol") == 2


def test_fields_of_other_configurations_are_not_declared_without_a_value(server: Server) -> None:
    parsed = _parse(_exposition(server.stats()))
    assert "blkback_pool_pages" in parsed  # declared even with no ring
    assert "blkback_auto_squeeze_duration_seconds" not in parsed  # not under this policy
