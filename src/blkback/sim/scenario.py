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
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from blkback.clock import NS_PER_MS, NS_PER_S
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
    nbd: bool = False  # NBD requests: up to max_indirect_segments pages, no indirect pages
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
    sample_ms: float = 0.0  # >0: record pool pages and memory every sample_ms ("samples")
    # True: each disk draws from its own random stream (seeded by the host's seed and the
    # disk's index), so hosts that differ only in a policy see the same guest I/O even when
    # the policy changes the order of events; False: one stream for the host (the seed runs).
    disk_rng: bool = False

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
            sample_ms=float(d.get("sample_ms", 0.0)),
            disk_rng=bool(d.get("disk_rng", False)),
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
        self.samples: list[dict[str, Any]] = []
        g = sc.guests
        pager = self.host if sc.host.pool_swappable else None
        max_segs = max(1, g.max_indirect_segments)
        if not g.nbd:
            max_segs = min(MAX_INDIRECT_SEGMENTS, max_segs)
        for vm in range(g.vms):
            for d in range(g.disks_per_vm):
                device = self.bus.add_device(f"vm{vm}/xvd{d}")
                for _r in range(g.rings_per_disk):
                    ring = device.add_ring(self.host.allocator, 0)
                    disk = Disk(
                        f"{device.name}/{ring.ring_id}",
                        ring,
                        self.loop,
                        self._disk_rng(len(self.disks)),
                        volume=g.volume,
                        workload=g.workload,
                        cost=sc.cost,
                        queue_depth=min(g.queue_depth, 32 * g.ring_pages),
                        max_segs=max_segs,
                        quantum_ms=sc.io_quantum_ms,
                    )
                    disk.indirect = not g.nbd
                    disk.pager = pager
                    self.disks.append(disk)
                    ring.waker = self._waker(ring)
                    self.loop.at(ring.next_pass_ns(), self._timer, ring)
        self.host.rings = [d.ring for d in self.disks]
        period = int(g.workload.period_s * NS_PER_S)
        for i, disk in enumerate(self.disks):
            disk.burst_at = period * i // len(self.disks)  # periodic: staggered
            disk.start()
        if sc.sample_ms > 0:
            self.loop.at(0, self._sample)

    def _disk_rng(self, index: int) -> random.Random:
        """The random stream of the disk with this index (see ``Scenario.disk_rng``)."""
        if not self.sc.disk_rng:
            return self.rng
        return random.Random(self.sc.seed * 1_000_003 + index)

    # -- the ring loop ----------------------------------------------------------------------
    def _timer(self, ring: Ring, now: int) -> None:
        """The 100 ms wait_event_interruptible_timeout of xen_blkif_schedule."""
        if ring.pass_due(now):
            if self.sc.host.pool_swappable:
                self.host.pool_pass(ring, now, had_io=False)
            else:
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
        if self.sc.host.pool_swappable:
            self.host.pool_pass(ring, now, had_io=False, woken=True)
        else:
            ring.loop_pass(now, had_io=False, woken=True)
        self.wake_passes += 1

    def _sample(self, _arg: object, now: int) -> None:
        """Pool pages and memory now, like the sampler of ``blkback repro``."""
        host = self.host
        pools = [len(d.ring.pool) for d in self.disks]
        self.samples.append(
            {
                "t": round(now / NS_PER_S, 3),
                "pool_pages": sum(pools),
                "rings_nonempty": sum(1 for p in pools if p),
                "in_flight_pages": sum(d.ring.pool.in_flight for d in self.disks),
                "pool_swapped_pages": host.pool_swapped_total,
                "used_pages": host.used,
                "swap_used_pages": host.swap_used,
                "pswpin": host.pswpin,
                "pswpout": host.pswpout,
                "squeezes": sum(dev.squeezes for dev in self.bus.devices.values()),
            }
        )
        self.loop.at(now + int(self.sc.sample_ms * NS_PER_MS), self._sample)

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
            "refills": sum(d.ring.stats.refill_after_squeeze_pages for d in self.disks),
            "squeezed_alloc_pages": sum(d.ring.stats.squeezed_alloc_pages for d in self.disks),
            "squeezes": sum(dev.squeezes for dev in self.bus.devices.values()),
            "idle_passes": self.idle_passes,
            "wake_passes": self.wake_passes,
            "requests": sum(d.stats.requests for d in self.disks),
            "failed_submits": sum(d.stats.failed_submits for d in self.disks),
            "throughput_mbps": bytes_done / 1e6 / secs if secs else 0.0,
        }
        if self.params.squeeze_policy == "auto":
            out["auto"] = self.auto_state()
        if self.samples:
            out["samples"] = self.samples
        runs = [r for d in self.disks for r in d.stats.dd_runs]
        if runs:
            out["dd_mbps"] = [
                self.sc.guests.workload.dd_bytes / 1e6 / ((e - s) / NS_PER_S) for s, e in runs
            ]
        return out

    def auto_state(self) -> dict[str, Any]:
        """The auto policy's durations in force at the end (ms: devices) and its decisions."""
        durations: dict[str, int] = {}
        lengthened = shortened = 0
        for device in self.bus.devices.values():
            ctl = device.squeeze.auto
            if ctl is None:
                continue
            key = f"{ctl.duration_ns / NS_PER_MS:g}"
            durations[key] = durations.get(key, 0) + 1
            lengthened += ctl.lengthened
            shortened += ctl.shortened
        return {"durations_ms": durations, "lengthened": lengthened, "shortened": shortened}


def run_scenario(sc: Scenario | Mapping[str, Any]) -> dict[str, Any]:
    """Build and run one host; return its result dict (picklable, JSON-able)."""
    scenario = sc if isinstance(sc, Scenario) else Scenario.from_dict(sc)
    return SimHost(scenario).run()


# -- presets ------------------------------------------------------------------------------


SEED_BACKGROUND_IOPS = 200.0  # per disk, the random workload's default rate: not fitted


def seed_pressure(
    variant: str = "after",
    *,
    duration_ms: int = 10,
    seed: int = 1,
    background_iops: float = SEED_BACKGROUND_IOPS,
) -> Scenario:
    """The seed's memory-pressure test: ~100 network volumes with bursty writers.

    Every disk also serves random I/O at ``background_iops`` (4-128 KiB requests) during and
    between its bursts: the seed's guests "induce I/O" on every device, so every ring runs a
    loop pass every few ms and none sits idle on its pool for 100 ms. Free pool pages are
    still left behind by the bursts (up to ``max_buffer_pages`` per ring). With 0 the rings
    idle between bursts (the model before the knee investigation: no knee, see
    docs/sim/calibration/README.md).

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
        guests=GuestConfig(workload=WorkloadConfig(background_iops=background_iops)),
    )


def seed_pressure_busy(variant: str = "after", *, duration_ms: int = 10, seed: int = 1) -> Scenario:
    """A smaller host whose pool memory sits on busy rings (beyond the seed).

    30 disks on a 560 MiB dom0 (the seed host's proportions), each writing bursts of 0.5 MB
    (exponential) with 10 ms mean gaps, for 20 s: every ring passes every few ms, so the lazy
    squeeze catches it even with a short window. Shows where the duration's knee moves when
    idle rings do not hold the pools.
    """
    sc = seed_pressure(variant, duration_ms=duration_ms, seed=seed, background_iops=0.0)
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


HOG_SWEEPS_PER_S = 50.0  # the repro hog rewrites its pages in a Python loop: a guess, see calibrate
GUEST_JITTER_MS = 10.0  # the repro guest (one Python process, 64 connections) starts bursts late
REPORT_DELAY_MS = 1.0  # vmpressure eventfd -> the server's monitor thread -> reclaim_memory
VMPRESSURE_WIN = 512  # pages reclaimed per vmpressure event (the kernel's vmpressure_win)
DEFAULT_BASELINE_MIB = 44  # the repro server's cgroup usage before the hog, when not recorded


def repro_config_doc(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``config`` part of a ``blkback repro`` results.json (or ``doc`` if it is one)."""
    if "sizing" in doc:
        return doc
    cfg = doc.get("config")
    if isinstance(cfg, Mapping) and "sizing" in cfg:
        return cfg
    raise ValueError("not a blkback repro results.json: no config.sizing")


def scenario_from_repro(doc: Mapping[str, Any], config: str = "10", *, seed: int = 1) -> Scenario:
    """The simulated equivalent of one configuration of a ``blkback repro`` run.

    ``doc`` is repro's results.json (or its ``config`` part). Read from it: ``config.sizing``
    (``devices``, ``connections``, ``burst``, ``request``, ``period_s``, ``hog_mib``,
    ``slack_mib``, ``seconds``, ``sample_ms``), ``config.configurations[config].params`` (the
    server's parameters; the rest are the server's defaults, as in repro: waking squeeze,
    per-device deadline), ``config.swap.swaps`` (swap size) and, when the run recorded them,
    ``configurations[config].runs[*].sizes`` (the cgroup's baseline and limit) and
    ``.guest.burst_s_median`` (how long a burst took: the volume's effective rate).

    The host is repro's dom0: a cgroup v1 limit ``L = baseline + hog + slack`` (``memcg``),
    swappable pool pages, vmpressure reports 1 ms after every 512 pages reclaimed, the
    baseline as fixed memory, no page cache, and one process: the hog, all hot.
    """
    cfg = repro_config_doc(doc)
    sz = cfg["sizing"]
    confs = cfg.get("configurations", {})
    if config not in confs:
        raise ValueError(f"repro run has no configuration {config!r} (has: {', '.join(confs)})")
    params = dict(confs[config].get("params", {}))
    runs = []
    measured = doc.get("configurations", {}).get(config) if "config" in doc else None
    if isinstance(measured, Mapping):
        runs = list(measured.get("runs", []))
    mib = 2**20
    hog_mib = int(sz.get("hog_mib", 256))
    slack_mib = int(sz.get("slack_mib", 128))
    bases = [r["sizes"]["baseline_bytes"] / mib for r in runs if "sizes" in r]
    baseline = round(statistics.median(bases)) if bases else DEFAULT_BASELINE_MIB
    swaps = cfg.get("swap", {}).get("swaps", [])
    swap_mib = sum(int(s.get("size_kib", 0)) for s in swaps) // 1024 or 2048
    burst = int(sz.get("burst", 8 * mib))
    request = int(sz.get("request", 4 * mib))
    burst_s = [
        r["guest"]["burst_s_median"] for r in runs if (r.get("guest") or {}).get("burst_s_median")
    ]
    if burst_s:
        mbps = burst / statistics.median(burst_s) / 1e6
    else:
        mbps = _rate_mbps(str(sz.get("rate", "40M")))
    host = HostConfig(
        ram_mib=baseline + hog_mib + slack_mib,
        fixed_mib=baseline,
        file_mib=0,
        file_min_mib=0,
        swap_mib=swap_mib,
        procs=1,
        proc_anon_mib=hog_mib,
        hot_fraction=1.0,
        hot_touch_per_s=HOG_SWEEPS_PER_S * hog_mib * MIB_PAGES,
        cold_touch_per_s=0.0,
        memcg=True,
        pool_swappable=True,
        report_every_pages=VMPRESSURE_WIN,
        report_delay_ms=REPORT_DELAY_MS,
    )
    pages_per_request = max(1, request // 4096)
    guests = GuestConfig(
        vms=1,
        disks_per_vm=int(sz.get("devices", 64)),
        rings_per_disk=int(sz.get("connections", 1)),
        max_indirect_segments=pages_per_request,
        queue_depth=max(1, burst // request),
        nbd=True,
        volume=VolumeConfig(mbps=mbps, latency_ms=0.0),
        workload=WorkloadConfig(
            kind="periodic",
            burst_mean_mb=burst / mib,
            period_s=float(sz.get("period_s", 8.0)),
            jitter_ms=GUEST_JITTER_MS,
        ),
    )
    return Scenario(
        name=f"repro:{config}",
        seed=seed,
        duration_s=float(sz.get("seconds", 60.0)),
        params=params,
        host=host,
        guests=guests,
        sample_ms=float(sz.get("sample_ms", 200)),
    )


def _rate_mbps(text: str) -> float:
    """A storage rate such as ``40M`` (binary units, as blkback's specs) in MB/s."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    t = text.strip().upper()
    mult = units.get(t[-1:], 1)
    return float(t.rstrip("KMG")) * mult / 1e6
