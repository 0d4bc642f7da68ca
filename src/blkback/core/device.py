"""Devices and the backend bus: who is told about memory pressure, and the squeeze deadline.

* :class:`Device` is one export as the clients see it (``xen_blkif``). Its rings are the
  connections to it (``xen_blkif_ring``); NBD multi-conn gives a device several rings, as
  blkfront's queues do. It stores the squeeze decision in force (whose ``end_ns`` is the
  kernel's ``buffer_squeeze_end``, zero at start).
* :class:`Bus` is the xenbus backend bus: it knows every device and is what the pressure
  monitor calls, as the single backend shrinker's ``count_objects`` walks the bus and calls
  each bound driver's ``reclaim_memory`` (blkback-spec §3).

The squeeze flows down: a report reaches :meth:`Bus.reclaim_memory`, then each
:meth:`Device.reclaim_memory`, which asks the policy in force (:attr:`Bus.policy`) for a
:class:`~blkback.core.policy.SqueezeDecision`, stores it and wakes its rings. A ring's pass
asks its device for its target (:meth:`Device.pool_target`), which the policy computes from
the stored decision. The policy never writes into a device.

Scope. With ``squeeze_scope=device`` (Linux 5.6+) each device has its own decision. With
``global`` (the seed patch) one decision, stored on the bus, serves all devices; a report then
sets it once, as the seed's shrinker did.

Teardown safety (the 5.6 ``reclaim_sem`` fix): a device removed from the bus is no longer
reachable by reports, and :meth:`Device.reclaim_memory` on a device with no rings only
records the deadline. The runners serialise reports with ring creation and removal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from blkback.clock import NS_PER_MS
from blkback.core.autotune import NO_FACTS, PoolFacts
from blkback.core.pages import PageAllocator
from blkback.core.params import Params
from blkback.core.policy import (
    NO_SQUEEZE,
    PressureLevel,
    SqueezeDecision,
    SqueezePolicy,
    policy_named,
)
from blkback.core.ring import Ring, RingOwner


class Device(RingOwner):
    """One export and its rings (the owner :class:`~blkback.core.ring.Ring` expects)."""

    def __init__(self, name: str, bus: Bus) -> None:
        self.name = name
        self.bus = bus
        self.params = bus.params
        self.rings: list[Ring] = []
        self._own_squeeze = NO_SQUEEZE
        self.squeeze_level: PressureLevel | None = None  # the level of this device's last report
        self.reclaims = 0  # reclaim_memory calls received
        self.squeezes = 0  # reports that started a new squeeze window
        self.squeeze_started_ns: int | None = None
        self._next_ring_id = 0

    # -- squeeze state --------------------------------------------------------------------
    @property
    def squeeze(self) -> SqueezeDecision:
        """The decision this device's rings follow (its own, or the bus's by scope)."""
        if self.params.squeeze_scope == "global":
            return self.bus.global_squeeze
        return self._own_squeeze

    def _store_squeeze(self, decision: SqueezeDecision) -> None:
        """Store a decision where the scope says (a plain store, as the kernel's: not a max)."""
        if self.params.squeeze_scope == "global":
            self.bus.global_squeeze = decision
        else:
            self._own_squeeze = decision
        self.squeeze_level = decision.level

    @property
    def squeeze_end_ns(self) -> int:
        """The deadline this device's rings compare against (``buffer_squeeze_end``)."""
        return self.squeeze.end_ns

    def squeezed(self, now_ns: int) -> bool:
        """Whether ``now_ns`` is inside the squeeze window (strict, like ``time_before``)."""
        return now_ns < self.squeeze.end_ns

    def reclaim_memory(self, now_ns: int, level: PressureLevel = PressureLevel.CRITICAL) -> None:
        """The driver's ``reclaim_memory`` callback: store the policy's decision.

        With ``squeeze_wake`` on, every ring of the device is asked to run its pass at once;
        with it off, nothing else happens (the kernel's lazy squeeze).
        """
        self.reclaims += 1
        current = self.squeeze
        was_squeezed = now_ns < current.end_ns
        policy = self.bus.policy
        facts = self.pool_facts() if policy.reads_pools else NO_FACTS
        decision = policy.decide(current, level, now_ns, self.params, facts)
        self._store_squeeze(decision)
        if not was_squeezed and now_ns < decision.end_ns:
            self.squeezes += 1
            self.squeeze_started_ns = now_ns
        if self.params.squeeze_wake:
            for ring in self.rings:
                ring.request_wake(now_ns)

    def pool_facts(self) -> PoolFacts:
        """What this device's rings hold and have allocated under squeezes (auto reads it)."""
        held = squeezed_allocs = 0
        for ring in self.rings:
            held += len(ring.pool)
            squeezed_allocs += ring.stats.squeezed_alloc_pages
        return PoolFacts(held, squeezed_allocs)

    def pool_target(self, last_io_ns: int, now_ns: int) -> int:
        """The pool size a ring whose last I/O was at ``last_io_ns`` shrinks to at ``now_ns``."""
        params = self.params
        bus = self.bus
        # self.squeeze, inlined: this runs on every loop pass.
        squeeze = bus.global_squeeze if params.squeeze_scope == "global" else self._own_squeeze
        return bus.policy.target(squeeze, now_ns, last_io_ns, params)

    # -- rings ----------------------------------------------------------------------------
    def add_ring(self, allocator: PageAllocator, now_ns: int) -> Ring:
        """Connect a new ring with an empty pool."""
        ring = Ring(self, self._next_ring_id, allocator, now_ns)
        self._next_ring_id += 1
        self.rings.append(ring)
        return ring

    def remove_ring(self, ring: Ring) -> int:
        """Disconnect: free the whole pool (``xen_blkbk_free_caches``); return pages freed.

        Pages still in flight are the caller's to return first; removing a ring with pages
        in flight is a bug and raises.
        """
        if ring.pool.in_flight:
            raise RuntimeError(
                f"ring {self.name}/{ring.ring_id} removed with "
                f"{ring.pool.in_flight} pages in flight"
            )
        freed = ring.pool.shrink(0, self.params.batch_free_pages)
        ring.closed = True
        self.rings.remove(ring)
        self.bus.retire_ring(ring)
        return freed

    def emit_stats(self, line: str) -> None:
        """Deliver a ``log_stats`` line to the bus's sink."""
        self.bus.emit_stats(line)

    def snapshot(self, now_ns: int) -> dict[str, object]:
        """This device's state for ``ctl stats --json``."""
        end = self.squeeze_end_ns
        auto = self.squeeze.auto
        return {
            "name": self.name,
            "squeeze_end_ms": None if end == 0 else end / NS_PER_MS,
            "squeezed": self.squeezed(now_ns),
            "squeeze_level": None
            if self.squeeze_level is None
            else self.squeeze_level.name.lower(),
            "reclaims": self.reclaims,
            "squeezes": self.squeezes,
            "auto": None if auto is None else auto.snapshot(),
            "rings": [ring.snapshot() for ring in self.rings],
        }


class Bus:
    """All devices of one server (or one simulated host): the target of pressure reports."""

    def __init__(self, params: Params | None = None) -> None:
        self.params = params if params is not None else Params()
        self.devices: dict[str, Device] = {}
        self.reports = 0
        self.stats_sink: Callable[[str], None] | None = None
        # Totals of rings that have gone, so that counters never move backwards.
        # pages_reclaimed: in flight when a connection died, returned at close.
        self.retired = {"rings": 0, "pages_allocated": 0, "pages_freed": 0, "pages_reclaimed": 0}
        self.global_squeeze = NO_SQUEEZE  # the decision in force with squeeze_scope=global
        #: The policy in force, selected by ``params.squeeze_policy`` and kept current by a
        #: listener, so that a ring's pass (every batch of requests) does not look it up by name.
        self.policy: SqueezePolicy = policy_named(self.params.squeeze_policy)
        self.params.subscribe(self._param_changed)

    def _param_changed(self, name: str, old: object, new: object) -> None:
        if name == "squeeze_policy":
            self.policy = policy_named(self.params.squeeze_policy)

    def add_device(self, name: str) -> Device:
        """Register a device; names are unique."""
        if name in self.devices:
            raise ValueError(f"device {name!r} exists already")
        device = Device(name, self)
        self.devices[name] = device
        return device

    def remove_device(self, name: str) -> None:
        """Unregister a device that has no rings left."""
        device = self.devices[name]
        if device.rings:
            raise RuntimeError(f"device {name!r} still has {len(device.rings)} rings")
        del self.devices[name]

    def rings(self) -> Iterator[Ring]:
        """Every ring of every device."""
        for device in self.devices.values():
            yield from device.rings

    def reclaim_memory(self, now_ns: int, level: PressureLevel = PressureLevel.CRITICAL) -> int:
        """The backend shrinker's ``count_objects``: tell every device; return how many.

        Like the kernel's count, it frees nothing itself and reports nothing freed: the rings
        free their pages on their own passes.
        """
        self.reports += 1
        for device in list(self.devices.values()):
            device.reclaim_memory(now_ns, level)
        return len(self.devices)

    def retire_ring(self, ring: Ring) -> None:
        """Fold a removed ring's counters into the bus totals."""
        self.retired["rings"] += 1
        self.retired["pages_allocated"] += ring.pool.pages_allocated
        self.retired["pages_freed"] += ring.pool.pages_freed
        self.retired["pages_reclaimed"] += ring.stats.extra.get("pages_reclaimed_at_close", 0)

    def emit_stats(self, line: str) -> None:
        """Deliver a ``log_stats`` line (to the server's log, or nowhere)."""
        if self.stats_sink is not None:
            self.stats_sink(line)

    def pool_pages(self) -> int:
        """Free pages in all pools."""
        return sum(len(r.pool) for r in self.rings())

    def in_flight_pages(self) -> int:
        """Pages in flight on all rings."""
        return sum(r.pool.in_flight for r in self.rings())
