"""Devices and the backend bus: who is told about memory pressure, and the squeeze deadline.

* :class:`Device` is one export as the clients see it (``xen_blkif``). Its rings are the
  connections to it (``xen_blkif_ring``); NBD multi-conn gives a device several rings, as
  blkfront's queues do. It holds ``squeeze_end_ns`` (``buffer_squeeze_end``, zero at start).
* :class:`Bus` is the xenbus backend bus: it knows every device and is what the pressure
  monitor calls, as the single backend shrinker's ``count_objects`` walks the bus and calls
  each bound driver's ``reclaim_memory`` (blkback-spec §3).

Scope. With ``squeeze_scope=device`` (Linux 5.6+) each device has its own deadline. With
``global`` (the seed patch) one deadline, stored on the bus, serves all devices; a report then
sets it once, as the seed's shrinker did.

Teardown safety (the 5.6 ``reclaim_sem`` fix): a device removed from the bus is no longer
reachable by reports, and :meth:`Device.reclaim_memory` on a device with no rings only
records the deadline. The runners serialise reports with ring creation and removal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from blkback.core.autotune import DurationController
from blkback.core.clock import NS_PER_MS
from blkback.core.pages import PageAllocator
from blkback.core.params import Params
from blkback.core.policy import PressureLevel, SqueezePolicy, policy_named
from blkback.core.ring import Ring


class Device:
    """One export and its rings."""

    def __init__(self, name: str, bus: Bus) -> None:
        self.name = name
        self.bus = bus
        self.params = bus.params
        self.rings: list[Ring] = []
        self._own_squeeze_end_ns = 0
        self.squeeze_level: PressureLevel | None = None
        self.reclaims = 0  # reclaim_memory calls received
        self.squeezes = 0  # reports that started a new squeeze window
        self.squeeze_started_ns: int | None = None
        #: The auto policy's duration controller, from the first report it handles.
        self.auto: DurationController | None = None
        self._next_ring_id = 0

    # -- squeeze state --------------------------------------------------------------------
    @property
    def policy(self) -> SqueezePolicy:
        """The squeeze policy currently selected by ``params.squeeze_policy``."""
        return self.bus.policy

    @property
    def squeeze_end_ns(self) -> int:
        """The deadline this device's rings compare against (own or global by scope)."""
        if self.params.squeeze_scope == "global":
            return self.bus.global_squeeze_end_ns
        return self._own_squeeze_end_ns

    def set_squeeze_end(self, end_ns: int) -> None:
        """Store a deadline (a plain store, as the kernel does: not a max)."""
        if self.params.squeeze_scope == "global":
            self.bus.global_squeeze_end_ns = end_ns
        else:
            self._own_squeeze_end_ns = end_ns

    def squeezed(self, now_ns: int) -> bool:
        """Whether ``now_ns`` is inside the squeeze window (strict, like ``time_before``)."""
        return now_ns < self.squeeze_end_ns

    def reclaim_memory(self, now_ns: int, level: PressureLevel = PressureLevel.CRITICAL) -> None:
        """The driver's ``reclaim_memory`` callback: let the policy set the squeeze state.

        With ``squeeze_wake`` on, every ring of the device is asked to run its pass at once;
        with it off, nothing else happens (the kernel's lazy squeeze).
        """
        self.reclaims += 1
        was_squeezed = self.squeezed(now_ns)
        self.policy.on_reclaim(self, level, now_ns)
        if not was_squeezed and self.squeezed(now_ns):
            self.squeezes += 1
            self.squeeze_started_ns = now_ns
        if self.params.squeeze_wake:
            for ring in self.rings:
                ring.request_wake(now_ns)

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

    def auto_state(self) -> dict[str, object] | None:
        """The auto policy's state for this device (duration in force, why), or None."""
        return None if self.auto is None else self.auto.state()

    def snapshot(self, now_ns: int) -> dict[str, object]:
        """This device's state for ``ctl stats --json``."""
        end = self.squeeze_end_ns
        return {
            "name": self.name,
            "squeeze_end_ms": None if end == 0 else end / NS_PER_MS,
            "squeezed": self.squeezed(now_ns),
            "squeeze_level": None
            if self.squeeze_level is None
            else self.squeeze_level.name.lower(),
            "reclaims": self.reclaims,
            "squeezes": self.squeezes,
            "auto": self.auto_state(),
            "rings": [ring.snapshot() for ring in self.rings],
        }


class Bus:
    """All devices of one server (or one simulated host): the target of pressure reports."""

    def __init__(self, params: Params | None = None) -> None:
        self.params = params if params is not None else Params()
        self.devices: dict[str, Device] = {}
        self.global_squeeze_end_ns = 0
        self.reports = 0
        self.stats_sink: Callable[[str], None] | None = None
        # Totals of rings that have gone, so that counters never move backwards.
        # pages_reclaimed: in flight when a connection died, returned at close.
        self.retired = {"rings": 0, "pages_allocated": 0, "pages_freed": 0, "pages_reclaimed": 0}
        #: The policy selected by ``params.squeeze_policy``, kept current by a listener so
        #: that a ring's pass (every batch of requests) does not look it up by name.
        self.current_policy: SqueezePolicy = policy_named(self.params.squeeze_policy)
        self.params.subscribe(self._param_changed)

    def _param_changed(self, name: str, old: object, new: object) -> None:
        if name == "squeeze_policy":
            self.current_policy = policy_named(self.params.squeeze_policy)

    @property
    def policy(self) -> SqueezePolicy:
        """The squeeze policy selected by the parameters."""
        return self.current_policy

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
