"""The pressure monitor: kernel signals in, fused and coalesced ``deliver`` calls out.

::

    monitor = PressureMonitor(deliver, mode="auto")
    monitor.start()            # opens what works; status() says what failed and why
    monitor.report(PressureLevel.CRITICAL)   # a manual report (ctl pressure)
    monitor.stop()

``deliver(level, source_name)`` is called once per decision to deliver (see
:mod:`~blkback.pressure.fusion`): ``level`` is the fused level, ``source_name`` the source
whose event triggered it (``"vmpressure"``, ``"psi-total"``, ``"manual"``...). It runs on the
monitor's poll thread (or on the thread calling :meth:`PressureMonitor.report`), never under
the monitor's own lock, so it may take the server's lock and call
``bus.reclaim_memory(now_ns, level)``. It must be short: it holds up the other sources.

Modes. ``"auto"`` opens every source that works here: PSI triggers and PSI totals, global and
for the own cgroup v2 (when that is not the root, which the global files already cover), and
cgroup v1 vmpressure on the own memory cgroup; MemAvailable only when none of those work.
When the service manager sets ``$MEMORY_PRESSURE_WATCH`` (systemd's protocol, see
:mod:`~blkback.pressure.systemd`), ``"auto"`` watches only what it names, with its trigger,
and nothing when it says ``/dev/null``: the unit's choice wins, as in sd-event.
Otherwise ``mode`` is a comma-separated list of :data:`SOURCE_NAMES`; a listed source that
fails is an error. ``"manual"`` (the manual source alone) never fails. Manual reports work
in every mode.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from blkback.clock import NS_PER_MS, Clock, MonotonicClock
from blkback.core.policy import PressureLevel
from blkback.errors import ConfigError, EnvironmentProblem
from blkback.pressure.cgroups import CgroupLayout, read_layout
from blkback.pressure.fusion import LEVELS, Decision, Fuser, FusionConfig
from blkback.pressure.sources import (
    GLOBAL_PSI_MEMORY,
    ManualSource,
    MemAvailableSource,
    Poller,
    PsiTotalSource,
    PsiTriggerSource,
    Source,
    SourceEvent,
    VmpressureSource,
)
from blkback.pressure.systemd import ENV_WATCH, SystemdWatchSource, watch_from_environ

log = logging.getLogger(__name__)

Deliver = Callable[[PressureLevel, str], object]  # what it returns is not used
EventHook = Callable[[SourceEvent, Decision], None]

SOURCE_NAMES: tuple[str, ...] = (
    "systemd",
    "psi-trigger",
    "psi-trigger-cgroup",
    "psi-total",
    "psi-total-cgroup",
    "vmpressure",
    "meminfo",
    "manual",
)
ONSET_SOURCES = frozenset(SOURCE_NAMES) - {"manual", "meminfo"}


def parse_mode(mode: str) -> tuple[str, ...] | None:
    """None for ``auto``, else the listed source names (ConfigError on an unknown one)."""
    text = mode.strip()
    if text == "auto":
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ConfigError(
            "pressure mode is empty (auto, or a list of: " + ", ".join(SOURCE_NAMES) + ")"
        )
    unknown = [n for n in names if n not in SOURCE_NAMES]
    if unknown:
        raise ConfigError(
            f"unknown pressure source {', '.join(unknown)} (known: auto, {', '.join(SOURCE_NAMES)})"
        )
    return names


def cgroup_v2_pressure(layout: CgroupLayout) -> tuple[str | None, str]:
    """The own cgroup v2 ``memory.pressure`` path, or None and why not."""
    v2 = layout.v2_dir()
    if v2 is None:
        return None, "no cgroup v2 hierarchy mounted, or the process is not in it"
    if layout.v2_path in ("/", ""):
        return None, "the process is in the cgroup v2 root: the global PSI files cover it"
    path = os.path.join(v2, "memory.pressure")
    if not os.path.exists(path):
        return None, f"{path} does not exist"
    return path, ""


def build_sources(
    names: tuple[str, ...],
    layout: CgroupLayout,
    *,
    psi_period_ns: int,
    meminfo_period_ns: int,
) -> tuple[list[Source], dict[str, str]]:
    """Source objects for ``names``; names that cannot even be built, with the reason."""
    sources: list[Source] = []
    failed: dict[str, str] = {}
    cg_psi, cg_why = cgroup_v2_pressure(layout)
    mem_dir = layout.v1_dir("memory")
    for name in names:
        if name == "systemd":
            try:
                spec = watch_from_environ(os.environ)
            except EnvironmentProblem as exc:
                failed[name] = str(exc)
                continue
            if spec is None:
                failed[name] = (
                    f"${ENV_WATCH} is not set (systemd >= 254 sets it for a service with "
                    "MemoryPressureWatch=)"
                )
            else:
                sources.append(SystemdWatchSource(spec))
        elif name == "psi-trigger":
            sources.append(PsiTriggerSource(GLOBAL_PSI_MEMORY, "psi-trigger"))
        elif name == "psi-total":
            sources.append(PsiTotalSource(GLOBAL_PSI_MEMORY, "psi-total", period_ns=psi_period_ns))
        elif name in ("psi-trigger-cgroup", "psi-total-cgroup"):
            if cg_psi is None:
                failed[name] = cg_why
            elif name == "psi-trigger-cgroup":
                sources.append(PsiTriggerSource(cg_psi, name))
            else:
                sources.append(PsiTotalSource(cg_psi, name, period_ns=psi_period_ns))
        elif name == "vmpressure":
            if mem_dir is None:
                failed[name] = "no cgroup v1 memory controller mounted, or not a member of it"
            else:
                sources.append(VmpressureSource(mem_dir))
        elif name == "meminfo":
            sources.append(MemAvailableSource(cgroup_dir=mem_dir, period_ns=meminfo_period_ns))
    return sources, failed


class PressureMonitor:
    """Runs the pressure sources and calls ``deliver(level, source)`` for fused reports."""

    def __init__(
        self,
        deliver: Deliver,
        *,
        mode: str = "auto",
        clock: Clock | None = None,
        coalesce_ms: float = 1.0,
        fusion: FusionConfig | None = None,
        psi_period_ms: float = 50.0,
        meminfo_period_ms: float = 250.0,
        on_event: EventHook | None = None,
        layout: CgroupLayout | None = None,
        park_quiet_sampling: bool = False,
    ) -> None:
        self.deliver = deliver
        # Whether quiet PSI totals stop sampling while an event-driven source runs (see
        # Poller): the server asks for it; `pressure watch` keeps its samples coming.
        self.park_quiet_sampling = park_quiet_sampling
        self.mode = mode
        self._names = parse_mode(mode)  # validates now: a bad mode is a ConfigError
        self.clock: Clock = clock or MonotonicClock()
        config = fusion or FusionConfig()
        config.coalesce_ns = round(coalesce_ms * NS_PER_MS)
        self.fuser = Fuser(config)
        self.psi_period_ns = round(psi_period_ms * NS_PER_MS)
        self.meminfo_period_ns = round(meminfo_period_ms * NS_PER_MS)
        self.on_event = on_event
        self._layout = layout
        self._lock = threading.Lock()
        self._manual = ManualSource(self.clock)
        self._poller: Poller | None = None
        self._opened: list[Source] = []  # kept after stop(), for the final status
        self.failed: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.started_ns: int | None = None
        self.counts: dict[str, dict[str, int]] = {}
        self.samples: dict[str, int] = {}
        self.first_event_ns: dict[str, int] = {}
        self.last_event_ns: int | None = None
        self.deliver_errors = 0

    # -- life cycle -----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether :meth:`start` ran and :meth:`stop` did not."""
        return self._poller is not None

    def start(self) -> None:
        """Open the sources and start the poll thread.

        Raises EnvironmentProblem when an explicitly listed source does not work.
        """
        if self._poller is not None:
            raise RuntimeError("pressure monitor already started")
        layout = self._layout or read_layout()
        auto = self._names is None
        from_unit = auto and ENV_WATCH in os.environ
        if from_unit:
            # The service manager chose what to watch (or nothing, with /dev/null).
            names: tuple[str, ...] = ("systemd",)
            for other in SOURCE_NAMES:
                if other not in ("systemd", "manual"):
                    self.skipped[other] = f"${ENV_WATCH} is set: the unit's watch is used"
        elif auto:
            names = tuple(n for n in SOURCE_NAMES if n not in ("systemd", "meminfo", "manual"))
            self.skipped["systemd"] = f"${ENV_WATCH} is not set: no service manager's watch"
        else:
            assert self._names is not None
            names = self._names
        sources, failed = build_sources(
            tuple(n for n in names if n != "manual"),
            layout,
            psi_period_ns=self.psi_period_ns,
            meminfo_period_ns=self.meminfo_period_ns,
        )
        poller = self._poller_of(sources)
        failed.update(poller.start())
        if from_unit:
            pass  # no fallback: a disabled or broken watch is reported in ``failed``
        elif auto:
            if not poller.running:
                # Nothing event-driven works: fall back to MemAvailable sampling.
                poller.stop()
                extra, more_failed = build_sources(
                    ("meminfo",),
                    layout,
                    psi_period_ns=self.psi_period_ns,
                    meminfo_period_ns=self.meminfo_period_ns,
                )
                poller = self._poller_of(extra)
                failed.update(more_failed)
                failed.update(poller.start())
            else:
                self.skipped["meminfo"] = "not needed: a kernel pressure signal works"
        elif failed:
            poller.stop()
            raise EnvironmentProblem(
                "pressure sources do not work here: "
                + "; ".join(f"{n}: {why}" for n, why in failed.items())
            )
        self._manual.open(self.clock.now_ns(), self._on_event)
        self.failed = failed
        self.started_ns = self.clock.now_ns()
        self._opened = list(poller.running)
        self._poller = poller
        log.info(
            "pressure monitor: active %s; failed %s",
            ", ".join(self.active_sources()) or "none",
            "; ".join(f"{n}: {w}" for n, w in failed.items()) or "none",
        )

    def _poller_of(self, sources: list[Source]) -> Poller:
        return Poller(
            sources,
            self._on_event,
            clock=self.clock,
            on_failure=self._on_failure,
            park_quiet=self.park_quiet_sampling,
        )

    def stop(self) -> None:
        """Stop the thread and close the sources (idempotent)."""
        if self._poller is not None:
            self._poller.stop()
            self._poller = None

    def __enter__(self) -> PressureMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def active_sources(self) -> list[str]:
        """Names of the sources running now (``manual`` always)."""
        running = [s.name for s in self._poller.running] if self._poller is not None else []
        return [*running, "manual"]

    # -- reports --------------------------------------------------------------------------
    def report(self, level: PressureLevel, source: str = "manual") -> Decision:
        """A manual report: goes through coalescing like any event; returns the decision."""
        return self._handle(SourceEvent(source, level, self.clock.now_ns()), trusted=True)

    def _on_event(self, event: SourceEvent) -> None:
        self._handle(event, trusted=False)

    def _on_failure(self, name: str, reason: str) -> None:
        with self._lock:
            self.failed[name] = reason

    def _handle(self, event: SourceEvent, *, trusted: bool) -> Decision:
        with self._lock:
            name = event.source
            if event.level is None:
                self.samples[name] = self.samples.get(name, 0) + 1
            else:
                per = self.counts.setdefault(name, {lv.name.lower(): 0 for lv in LEVELS})
                per[event.level.name.lower()] += 1
                self.first_event_ns.setdefault(name, event.now_ns)
                self.last_event_ns = event.now_ns
            decision = self.fuser.observe(name, event.level, event.now_ns, trusted=trusted)
        if decision.deliver and decision.level is not None:
            try:
                self.deliver(decision.level, name)
            except Exception:
                self.deliver_errors += 1
                log.exception("pressure delivery from %s failed", name)
        if self.on_event is not None:
            self.on_event(event, decision)
        return decision

    # -- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        """JSON-able state: sources, counts per source and level, coalescing, failures."""
        now = self.clock.now_ns()
        with self._lock:
            fuser = self.fuser
            sources: dict[str, object] = {}
            running = set(self._poller.running) if self._poller is not None else set()
            parked = set(self._poller.parked) if self._poller is not None else set()
            for src in self._opened:
                info = src.info()
                info["running"] = src in running
                if src.period_ns is not None:
                    info["parked"] = src in parked
                sources[src.name] = info
            fresh, sev = fuser.severity(now)
            return {
                "mode": self.mode,
                "running": self.running,
                "active": self.active_sources(),
                "failed": dict(self.failed),
                "skipped": dict(self.skipped),
                "sources": sources,
                "events": {k: dict(v) for k, v in self.counts.items()},
                "samples": dict(self.samples),
                "delivered": dict(fuser.delivered),
                "coalesced": fuser.coalesced,
                "unconfirmed": fuser.unconfirmed,
                "deliver_errors": self.deliver_errors,
                "coalesce_ms": fuser.config.coalesce_ns / NS_PER_MS,
                "severity": (sev.name.lower() if sev is not None else None) if fresh else "stale",
                "first_event_s": {
                    k: round((v - (self.started_ns or 0)) / 1e9, 4)
                    for k, v in self.first_event_ns.items()
                },
                "last_event_age_s": None
                if self.last_event_ns is None
                else round((now - self.last_event_ns) / 1e9, 4),
                "last_delivery": None
                if fuser.last_delivery_ns is None or fuser.last_delivery_level is None
                else {
                    "level": fuser.last_delivery_level.name.lower(),
                    "source": fuser.last_delivery_source,
                    "age_s": round((now - fuser.last_delivery_ns) / 1e9, 4),
                },
            }
