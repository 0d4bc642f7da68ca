"""A simulated Xen host: dom0 memory, the core Bus/Device/Ring objects, guests, and the run.

:class:`Scenario` is plain data (JSON round-trips through :meth:`Scenario.to_dict` /
:meth:`Scenario.from_dict`, so sweeps can ship it to workers). :func:`run_scenario` builds the
host on the **core** objects (``Bus``, ``Device``, ``Ring``, ``PagePool``, ``Params`` and the
policies) with a virtual clock and a :class:`~blkback.sim.host.HostAllocator` (a
``CountingAllocator`` charged to dom0's RAM), runs it, and returns a flat result dict.

The backend loop per ring (``xen_blkif_schedule``): a pass after each batch of requests (the
disk's tick), an idle pass whenever ``ring.pass_due`` (100 ms without a pass), and, with
``squeeze_wake`` on, an immediate pass when a squeeze asks for it through ``ring.waker``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from blkback.core.clock import NS_PER_S
from blkback.core.device import Bus
from blkback.core.params import Params
from blkback.core.ring import Ring
from blkback.sim.engine import EventLoop
from blkback.sim.guest import CpuCost, Disk, VolumeConfig, WorkloadConfig
from blkback.sim.host import MIB_PAGES, Host, HostConfig

WAKE_LATENCY_NS = 20_000  # a woken kthread runs ~20 us later
MAX_INDIRECT_SEGMENTS = 256  # what blkback advertises (feature-max-indirect-segments)


@dataclass(slots=True)
class GuestConfig:
    """The guests served by the host and their disks."""

    vms: int = 10
    disks_per_vm: int = 10
    rings_per_disk: int = 1
    ring_pages: int = 1  # blkfront max_ring_page_order 0: one page, 32 requests
    max_indirect_segments: int = 32  # Linux blkfront default
    queue_depth: int = 32
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)


@dataclass(slots=True)
class Scenario:
    """Everything one simulated host run needs."""

    name: str = "host"
    seed: int = 1
    duration_s: float = 60.0
    params: dict[str, Any] = field(default_factory=dict)
    host: HostConfig = field(default_factory=HostConfig)
    guests: GuestConfig = field(default_factory=GuestConfig)
    cost: CpuCost = field(default_factory=CpuCost)
    io_quantum_ms: float = 5.0
    trace: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scenario:
        g = dict(d.get("guests", {}))
        if "volume" in g:
            g["volume"] = VolumeConfig(**g["volume"])
        if "workload" in g:
            g["workload"] = WorkloadConfig(**g["workload"])
        return cls(
            name=d.get("name", "host"),
            seed=int(d.get("seed", 1)),
            duration_s=float(d.get("duration_s", 60.0)),
            params=dict(d.get("params", {})),
            host=HostConfig(**d.get("host", {})),
            guests=GuestConfig(**g),
            cost=CpuCost(**d.get("cost", {})),
            io_quantum_ms=float(d.get("io_quantum_ms", 5.0)),
            trace=bool(d.get("trace", False)),
        )

    def replace(self, **changes: Any) -> Scenario:
        return dataclasses.replace(self, **changes)


class SimHost:
    """One built host, ready to run."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.rng = random.Random(sc.seed)
        self.loop = EventLoop(trace=sc.trace)
        self.params = Params(**sc.params)
        self.bus = Bus(self.params)
        self.host = Host(sc.host, self.loop, self.bus)
        self.disks: list[Disk] = []
        self._wake_queued: set[int] = set()
        self.wake_passes = 0
        self.idle_passes = 0
        g = sc.guests
        for vm in range(g.vms):
            for d in range(g.disks_per_vm):
                device = self.bus.add_device(f"vm{vm}/xvd{d}")
                for _r in range(g.rings_per_disk):
                    ring = device.add_ring(self.host.allocator, 0)
                    disk = Disk(
                        f"{device.name}/{ring.ring_id}",
                        ring,
                        self.loop,
                        self.rng,
                        volume=g.volume,
                        workload=g.workload,
                        cost=sc.cost,
                        queue_depth=min(g.queue_depth, 32 * g.ring_pages),
                        max_segs=max(1, min(MAX_INDIRECT_SEGMENTS, g.max_indirect_segments)),
                        quantum_ms=sc.io_quantum_ms,
                    )
                    self.disks.append(disk)
                    ring.waker = self._waker(ring)
                    self.loop.at(ring.next_pass_ns(), self._timer, ring)
        for disk in self.disks:
            disk.start()

    # -- the ring loop ----------------------------------------------------------------------
    def _timer(self, ring: Ring, now: int) -> None:
        """The 100 ms wait_event_interruptible_timeout of xen_blkif_schedule."""
        if ring.pass_due(now):
            ring.loop_pass(now, had_io=False)
            self.idle_passes += 1
        self.loop.at(ring.next_pass_ns(), self._timer, ring)

    def _waker(self, ring: Ring) -> Any:
        key = id(ring)

        def wake() -> None:
            if key not in self._wake_queued:
                self._wake_queued.add(key)
                self.loop.after(WAKE_LATENCY_NS, self._woken, ring)

        return wake

    def _woken(self, ring: Ring, now: int) -> None:
        self._wake_queued.discard(id(ring))
        ring.loop_pass(now, had_io=False, woken=True)
        self.wake_passes += 1

    # -- run ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        end = int(self.sc.duration_s * NS_PER_S)
        if self.sc.guests.workload.kind != "dd":
            self.loop.run_until(end)
            return self.result()
        runs = self.sc.guests.workload.dd_runs
        t = 0
        while t < end and any(d.dd_done_runs < runs for d in self.disks):
            t = min(end, t + NS_PER_S)
            self.loop.run_until(t)
        return self.result()

    def check(self) -> None:
        """Conservation of pages across allocator, pools, requests in flight and RAM."""
        host = self.host
        host.check()
        alloc = host.allocator
        pools = sum(len(d.ring.pool) for d in self.disks)
        in_flight = sum(d.ring.pool.in_flight for d in self.disks)
        assert in_flight == sum(d.in_flight_pages() for d in self.disks)
        assert alloc.allocs - alloc.frees == pools + in_flight == host.pool_pages

    def result(self) -> dict[str, Any]:
        host = self.host
        secs = self.loop.now / NS_PER_S
        bytes_done = sum(d.stats.bytes_done for d in self.disks)
        squeezed = sum(d.ring.stats.pages_squeezed for d in self.disks)
        out: dict[str, Any] = {
            "name": self.sc.name,
            "seed": self.sc.seed,
            "sim_seconds": secs,
            "devices": len(self.bus.devices),
            "rings": len(self.disks),
            "events": self.loop.events,
            **host.counters(),
            "pool_pages_end": sum(len(d.ring.pool) for d in self.disks),
            "peak_pool_mib": host.peak_pool_pages / MIB_PAGES,
            "pages_allocated": host.allocator.allocs,
            "pages_freed": host.allocator.frees,
            "pages_squeezed": squeezed,
            "squeezes": sum(dev.squeezes for dev in self.bus.devices.values()),
            "idle_passes": self.idle_passes,
            "wake_passes": self.wake_passes,
            "requests": sum(d.stats.requests for d in self.disks),
            "failed_submits": sum(d.stats.failed_submits for d in self.disks),
            "throughput_mbps": bytes_done / 1e6 / secs if secs else 0.0,
        }
        runs = [r for d in self.disks for r in d.stats.dd_runs]
        if runs:
            out["dd_mbps"] = [
                self.sc.guests.workload.dd_bytes / 1e6 / ((e - s) / NS_PER_S) for s, e in runs
            ]
        return out


def run_scenario(sc: Scenario | Mapping[str, Any]) -> dict[str, Any]:
    """Build and run one host; return its result dict (picklable, JSON-able)."""
    scenario = sc if isinstance(sc, Scenario) else Scenario.from_dict(sc)
    return SimHost(scenario).run()


# -- presets ------------------------------------------------------------------------------


def seed_pressure(variant: str = "after", *, duration_ms: int = 10, seed: int = 1) -> Scenario:
    """The seed's memory-pressure test: ~100 network volumes with bursty writers.

    ``variant``: ``"before"`` is Linux 5.4 (no shrinker); ``"after"`` is the seed patch (one
    global deadline, lazy squeeze, ``aggressive_shrinking_duration = duration_ms``);
    ``"5.6"`` is the merged version (per-device deadline, lazy); ``"wake"`` adds blkback's
    waking squeeze to 5.6; ``"graded"`` is ``"wake"`` with the graded policy (kswapd reports
    MEDIUM, direct reclaim CRITICAL).
    """
    params: dict[str, Any] = {"buffer_squeeze_duration_ms": duration_ms, "squeeze_wake": False}
    host = HostConfig()
    if variant == "before":
        host.shrinker = False
    elif variant == "after":
        params["squeeze_scope"] = "global"
    elif variant == "5.6":
        params["squeeze_scope"] = "device"
    elif variant in ("wake", "graded"):
        params["squeeze_scope"] = "device"
        params["squeeze_wake"] = True
        if variant == "graded":
            params["squeeze_policy"] = "graded"
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return Scenario(
        name=f"pressure-{variant}-{duration_ms}ms",
        seed=seed,
        duration_s=60.0,
        params=params,
        host=host,
        guests=GuestConfig(),
    )


def seed_pressure_busy(variant: str = "after", *, duration_ms: int = 10, seed: int = 1) -> Scenario:
    """A smaller host whose pool memory sits on busy rings (beyond the seed).

    30 disks on a 560 MiB dom0 (the seed host's proportions), each writing bursts of 0.5 MB
    (exponential) with 10 ms mean gaps, for 20 s: every ring passes every few ms, so the lazy
    squeeze catches it even with a short window. Shows where the duration's knee moves when
    idle rings do not hold the pools.
    """
    sc = seed_pressure(variant, duration_ms=duration_ms, seed=seed)
    ram = 560
    f = ram / sc.host.ram_mib
    sc.host.ram_mib = ram
    sc.host.fixed_mib = int(sc.host.fixed_mib * f)
    sc.host.file_mib = int(sc.host.file_mib * f)
    sc.host.file_min_mib = int(sc.host.file_min_mib * f)
    sc.host.proc_anon_mib = int(sc.host.proc_anon_mib * f)
    sc.guests.vms, sc.guests.disks_per_vm = 3, 10
    wl = sc.guests.workload
    wl.burst_mean_mb, wl.gap_mean_s, wl.start_spread_s = 0.5, 0.01, 0.1
    sc.duration_s = 20.0
    sc.name = f"busy-{variant}-{duration_ms}ms"
    return sc


def seed_overhead(max_buffer_pages: int, *, volume: str = "slow", seed: int = 1) -> Scenario:
    """The seed's dd overhead test: one guest, one disk, 5 x (dd 512 MiB; sync), no pressure.

    ``volume="slow"`` is the seed's network volume (38.7 MB/s, the first run helped by an
    initial burst credit that reproduces its 45.8 MB/s); ``"fast"`` is a local-NVMe-like
    volume (2 GB/s, 0.1 ms) where the allocation cost can show.
    """
    if volume == "slow":
        vol = VolumeConfig(mbps=38.7, latency_ms=1.0, burst_mb=90.0, burst_mbps=400.0)
    elif volume == "fast":
        vol = VolumeConfig(mbps=2000.0, latency_ms=0.1)
    else:
        raise ValueError(f"unknown volume {volume!r}")
    return Scenario(
        name=f"overhead-{volume}-{max_buffer_pages}",
        seed=seed,
        duration_s=3600.0,
        params={"max_buffer_pages": max_buffer_pages},
        host=HostConfig(procs=2, proc_anon_mib=64),
        guests=GuestConfig(vms=1, disks_per_vm=1, volume=vol, workload=WorkloadConfig(kind="dd")),
    )


def scenario_from_repro(repro_config: Mapping[str, Any]) -> Scenario:
    """Calibration hook: the sim scenario equivalent to a ``blkback repro`` configuration.

    ``blkback repro`` does not exist yet. This maps the keys it is expected to have (all
    optional; unknown keys are ignored) so that a repro run and a sim run can be compared and
    the sim's host/volume constants fitted to real measurements:

    ``memory_limit_mib`` (the cgroup's memory.max) -> ``host.ram_mib``; ``swap_mib``;
    ``hog_mib`` / ``hog_procs`` (anonymous memory held by stressor processes) ->
    ``host.proc_anon_mib`` / ``host.procs``; ``devices`` (exports) and ``connections``
    (NBD connections per export) -> disks and rings; ``rate_mbps`` / ``delay_ms`` (the storage
    delay/rate filters) -> the volume; ``workload`` / ``dd_bytes`` / ``runs``; ``params``
    (blkback runtime parameters) -> ``Params``; ``duration_s``; ``seed``.
    """
    rc = repro_config
    host = HostConfig(
        ram_mib=int(rc.get("memory_limit_mib", 2048)),
        swap_mib=int(rc.get("swap_mib", 4096)),
        fixed_mib=int(rc.get("fixed_mib", 128)),
        file_mib=int(rc.get("file_mib", 64)),
        file_min_mib=int(rc.get("file_min_mib", 32)),
        procs=int(rc.get("hog_procs", 1)),
        proc_anon_mib=int(rc.get("hog_mib", 256)),
    )
    workload = WorkloadConfig(
        kind=str(rc.get("workload", "bursty")),
        dd_bytes=int(rc.get("dd_bytes", 512 * 2**20)),
        dd_runs=int(rc.get("runs", 5)),
    )
    guests = GuestConfig(
        vms=1,
        disks_per_vm=int(rc.get("devices", 100)),
        rings_per_disk=int(rc.get("connections", 1)),
        volume=VolumeConfig(
            mbps=float(rc.get("rate_mbps", 38.7)), latency_ms=float(rc.get("delay_ms", 1.0))
        ),
        workload=workload,
    )
    return Scenario(
        name=str(rc.get("name", "repro")),
        seed=int(rc.get("seed", 1)),
        duration_s=float(rc.get("duration_s", 60.0)),
        params=dict(rc.get("params", {})),
        host=host,
        guests=guests,
    )
