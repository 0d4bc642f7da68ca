"""Experiments 1, 2 and 4: many idle pools tip dom0 into swap, unless they are squeezed.

One run (:func:`run_once`):

1. a fresh cgroup v1 memory child ("dom0"), at first without a limit;
2. ``blkback serve`` joins it before it starts (so its pressure monitor listens to this
   cgroup's vmpressure), with ``devices`` exports ``null:1G,rate=…`` (emulated network
   volumes with no local footprint) and the run's parameters;
3. the guests (outside the cgroup) connect ``connections`` times to every export;
4. the cgroup's usage now is the baseline B (server, its threads, its empty rings);
   the limit becomes ``L = B + hog + slack``;
5. the dom0 workload: a hog of ``hog_mib`` anonymous MiB that it keeps touching, in the cgroup;
6. go: every ring gets a burst of ``burst`` bytes every ``period`` seconds, staggered, so its
   pool grows to ``max_buffer_pages`` (4 MiB) and is then retained while it idles. The pools
   P = rings x 4 MiB exceed the slack (``P > slack``), so without a squeeze the cgroup must
   swap; with it, each pressure event frees the idle pools and swapping stops;
7. after ``seconds``: the guests stop, and the deltas of ``pswpin``/``pswpout``
   (``/proc/vmstat``, host-wide, as the seed measured in dom0) and of the cgroup's own
   ``memory.stat`` counters are the result. Pool sizes, RSS, cgroup usage and swap and the
   pressure events are sampled every ``sample_ms`` throughout.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from blkback.clock import NS_PER_MS, NS_PER_S, Clock
from blkback.repro.shrinkerfeed import ShrinkerFeed
from blkback.repro.testbed import CLOCK, GuestProcess, Sampler, ServerProcess, poll_until

MIB = 1 << 20
CG_COUNTERS = ("pgmajfault", "workingset_refault_anon", "pgpgin", "pgpgout", "pgfault")
# Host-wide reclaim activity (dom0 is the only one reclaiming during a run): how often the
# kernel's reclaim ran, i.e. how often it would have called a registered shrinker.
RECLAIM_COUNTERS = (
    "pgscan_direct",
    "pgscan_kswapd",
    "pgsteal_direct",
    "pgsteal_kswapd",
    "allocstall_normal",
    "allocstall_movable",
    "pageoutrun",
    "slabs_scanned",
)


@dataclass(frozen=True)
class Sizing:
    """The test bed's sizes (one set for every configuration of a mode)."""

    devices: int = 64
    connections: int = 1
    burst: int = 8 * MIB
    request: int = 4 * MIB
    period_s: float = 8.0
    rate: str = "40M"
    hog_mib: int = 256
    slack_mib: int = 128
    seconds: float = 60.0
    settle_s: float = 2.0
    sample_ms: int = 200
    workers: int = 4

    @property
    def pools_mib(self) -> float:
        """What the pools retain when idle: rings x max_buffer_pages (1024) x 4 KiB."""
        return self.devices * self.connections * 4.0


@dataclass(frozen=True)
class Config:
    """One configuration of the server under test."""

    name: str
    params: dict[str, int | str] = field(default_factory=dict)
    label: str = ""
    # The seed's signal: pressure reports at reclaim's pace instead of the kernel's pressure
    # signals (see blkback.repro.shrinkerfeed).
    shrinker_feed: bool = False


class Guests(Protocol):
    """The guests of one run: connected once constructed; ready, go, finish (or stop)."""

    def wait_ready(self) -> None: ...
    def go(self) -> None: ...
    def finish(self) -> dict[str, Any]: ...
    def stop(self) -> None: ...


# (server, export names, sizing, workdir) -> connected guests
GuestFactory = Callable[[ServerProcess, list[str], "Sizing", Path], Guests]


def nbd_guests(server: ServerProcess, names: list[str], sizing: Sizing, workdir: Path) -> Guests:
    """libnbd programs on the host, one connection per ring (``--guests nbd``)."""
    return GuestProcess(
        server,
        names,
        connections=sizing.connections,
        burst=sizing.burst,
        request=sizing.request,
        period=sizing.period_s,
        seconds=sizing.seconds + 60,
    )


def run_once(
    config: Config,
    sizing: Sizing,
    workdir: Path,
    *,
    tag: str,
    guests: GuestFactory = nbd_guests,
    log: Any = None,
    clock: Clock = CLOCK,
) -> dict[str, Any]:
    """One run of the memory-pressure test bed; everything it made is gone on return."""
    from blkback.hostenv.cgroup import MemoryCgroup
    from blkback.hostenv.hog import MemoryHog
    from blkback.hostenv.procfs import read_vmstat, swap_counters

    workdir.mkdir(parents=True, exist_ok=True)
    names = [f"vol{i}" for i in range(sizing.devices)]
    exports = [f"{n}=null:1G,rate={sizing.rate}" for n in names]
    cg = MemoryCgroup(f"blkback-repro-{os.getpid()}-{tag}", limit_bytes=1 << 50, swappiness=60)
    result: dict[str, Any] = {"config": config.name, "params": dict(config.params), "tag": tag}
    with contextlib.ExitStack() as stack:
        cg.create()
        stack.callback(cg.remove)
        server = ServerProcess(
            workdir,
            exports,
            params=dict(config.params),
            cgroup_procs=os.path.join(cg.path, "cgroup.procs"),
            workers=sizing.workers,
            pressure="off" if config.shrinker_feed else "auto",
            tag=tag,
            clock=clock,
        )
        cg.started.add(server.pid)
        stack.callback(server.stop)
        guest = guests(server, names, sizing, workdir)
        stack.callback(guest.stop)
        _wait_for_rings(server, sizing.devices * sizing.connections, clock=clock)
        clock.wait_until(clock.now_ns() + 500 * NS_PER_MS)
        base = cg.usage_bytes()
        limit = base + (sizing.hog_mib + sizing.slack_mib) * MIB
        cg.write("memory.limit_in_bytes", limit)
        hog = stack.enter_context(MemoryHog(sizing.hog_mib, cgroup=cg))
        # Until the hog has touched 90 % of its memory (20 s at most: then it goes on anyway).
        poll_until(
            lambda: cg.usage_bytes() >= base + sizing.hog_mib * MIB * 0.9,
            timeout_ns=20 * NS_PER_S,
            interval_ns=50 * NS_PER_MS,
            clock=clock,
        )
        clock.wait_until(clock.now_ns() + round(sizing.settle_s * NS_PER_S))
        guest.wait_ready()  # VMs boot meanwhile (their disks connected when QEMU started)
        result["sizes"] = {
            "baseline_bytes": base,
            "limit_bytes": limit,
            "hog_bytes": sizing.hog_mib * MIB,
            "usage_before_go_bytes": cg.usage_bytes(),
            "server_pid": server.pid,
        }
        sw0 = swap_counters()
        vm0 = read_vmstat()
        fail0 = int(cg.read("memory.failcnt"))
        st0 = cg.stat()
        sampler = Sampler(server, cg.path, interval_ns=sizing.sample_ms * NS_PER_MS, clock=clock)
        sampler.start()
        feed = None
        if config.shrinker_feed:
            feed = ShrinkerFeed(
                os.path.join(cg.path, "memory.failcnt"), server.control, clock=clock
            )
            feed.start()
            stack.callback(feed.stop)
        t_go = clock.now_ns()
        end = t_go + round(sizing.seconds * NS_PER_S)
        guest.go()
        while clock.now_ns() < end:
            if not hog.alive():
                result["hog_died"] = True
                break
            if server.proc.poll() is not None:
                raise RuntimeError(f"server died: {server.log_tail()}")
            clock.wait_until(clock.now_ns() + 200 * NS_PER_MS)
        sw1 = swap_counters()
        vm1 = read_vmstat()
        fail1 = int(cg.read("memory.failcnt"))
        st1 = cg.stat()
        elapsed = (clock.now_ns() - t_go) / NS_PER_S
        sampler.stop()
        if feed is not None:
            result["shrinker_feed"] = feed.stop()
        with contextlib.suppress(Exception):
            sampler.samples.append(sampler.sample())
        final = server.stats()  # before the guests leave: their rings' counters
        result["guest"] = guest.finish()
        result["elapsed_s"] = elapsed
        result["pswpin"] = sw1.pswpin - sw0.pswpin
        result["pswpout"] = sw1.pswpout - sw0.pswpout
        result.update(zero_page_swaps(vm0, vm1))
        result["cgroup"] = {k: st1.get(k, 0) - st0.get(k, 0) for k in CG_COUNTERS}
        result["cgroup"]["failcnt"] = int(cg.read("memory.failcnt"))
        result["reclaim"] = {k: vm1.get(k, 0) - vm0.get(k, 0) for k in RECLAIM_COUNTERS} | {
            "cgroup_failcnt": fail1 - fail0,
            "seconds": elapsed,
        }
        result["cgroup"]["max_swap_bytes"] = max(
            (s.get("cg_swap", 0) for s in sampler.samples), default=0
        )
        result["hog_alive"] = hog.alive()
        result["server"] = _summary(final)
        result["pressure_monitor"] = final["pressure"]
        result["samples"] = sampler.samples
        result["sampler_errors"] = sampler.errors
    return result


# Since Linux 6.12 a zero-filled page is swapped out without I/O (a bit in the swap map) and
# counted here, not in pswpout; its swap-in likewise (swpin_zero, not pswpin).
ZERO_PAGE_COUNTERS = ("swpout_zero", "swpin_zero")


def zero_page_swaps(before: dict[str, int], after: dict[str, int]) -> dict[str, int | None]:
    """The deltas of ``swpout_zero``/``swpin_zero`` (None where the kernel has no such counter)."""
    return {
        k: (after[k] - before[k]) if k in after and k in before else None
        for k in ZERO_PAGE_COUNTERS
    }


def _wait_for_rings(
    server: ServerProcess, rings: int, *, timeout_ns: int = 60 * NS_PER_S, clock: Clock = CLOCK
) -> None:
    """Until every guest connection is a ring in the server (the baseline counts them)."""
    have = 0

    def arrived() -> bool:
        nonlocal have
        have = sum(len(d["rings"]) for d in server.stats()["devices"])
        return have >= rings

    if not poll_until(arrived, timeout_ns=timeout_ns, interval_ns=100 * NS_PER_MS, clock=clock):
        raise RuntimeError(f"only {have} of {rings} guest connections arrived")


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    rings = [r for d in stats["devices"] for r in d["rings"]]
    req = [r.get("requests", {}) for r in rings]
    return {
        "rings": len(rings),
        "pool_pages_end": sum(r["pool_pages"] for r in rings),
        "peak_pool_pages_sum": sum(r["peak_pool_pages"] for r in rings),
        "pages_allocated": sum(r["pages_allocated"] for r in rings),
        "pages_freed": sum(r["pages_freed"] for r in rings),
        "pages_trimmed": sum(q.get("pages_trimmed", 0) for q in req),
        "pages_squeezed": sum(q.get("pages_squeezed", 0) for q in req),
        "writes": sum(q.get("wr", 0) for q in req),
        "squeezes": sum(d["squeezes"] for d in stats["devices"]),
        "reclaims": sum(d["reclaims"] for d in stats["devices"]),
        "rss_bytes_end": stats["server"]["rss_bytes"],
        "pressure_reports": stats["pressure"]["reports"],
        "pressure_events": stats["pressure"].get("events", {}),
        "pressure_sources": (stats["pressure"].get("monitor") or {}).get("active"),
    }


def sizing_dict(sizing: Sizing) -> dict[str, Any]:
    d = asdict(sizing)
    d["pools_mib"] = sizing.pools_mib
    return d
