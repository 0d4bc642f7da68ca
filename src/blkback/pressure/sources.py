"""The kernel's memory-pressure signals, one class each, run by one shared poll thread.

Every source follows the same small life cycle: :meth:`Source.open` sets it up (or raises
:class:`~blkback.errors.EnvironmentProblem` saying what is missing), then it either offers file
descriptors to poll (:meth:`Source.fds`, handled by :meth:`Source.handle`) or asks to be
sampled every ``period_ns`` (:meth:`Source.tick`), and :meth:`Source.close` releases it. It
reports :class:`SourceEvent`\\ s to the function given to ``open``.

Threads. A :class:`Poller` runs any number of sources on **one** daemon thread: one
``poll(2)`` over every trigger fd and eventfd, with the timeout set by the next periodic
sample. Why one thread rather than one per source: the fusion of signals then sees events
in one order without a lock between sources; a vmpressure storm (hundreds of events/s) costs
one wake-up per batch, not a thread switch per source; and there is a single thing to stop.
The cost is that a slow callback delays the other sources, so callbacks must be short (the
monitor's is: a decision under a lock and one ``reclaim_memory`` call).

Each source can still be run alone with :meth:`Source.start` / :meth:`Source.stop`, which
gives it a private :class:`Poller`; the public callback then receives
``(level, source_name)`` for every event that carries a level.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass

from blkback.clock import NS_PER_MS, NS_PER_S, Clock, MonotonicClock
from blkback.core.policy import PressureLevel
from blkback.errors import EnvironmentProblem
from blkback.pressure.psi import (
    PRIVILEGED_TRIGGERS,
    UNPRIVILEGED_TRIGGERS,
    PsiSample,
    PsiThresholds,
    TriggerSpec,
    parse_psi,
    stall_fractions,
)

log = logging.getLogger(__name__)

GLOBAL_PSI_MEMORY = "/proc/pressure/memory"


@dataclass(frozen=True, slots=True)
class SourceEvent:
    """One report from a source.

    ``level`` is None only for a severity sample (PSI totals) that measured no pressure:
    it tells the fusion that the severity reading is fresh, and is never delivered.
    """

    source: str
    level: PressureLevel | None
    now_ns: int
    count: int = 1  # kernel events folded into this report (an eventfd's counter)
    severity: bool = False  # a periodic severity sample (PSI totals)
    some: float = 0.0  # stall fractions of the sample (severity samples only)
    full: float = 0.0


Emit = Callable[[SourceEvent], None]
PublicCallback = Callable[[PressureLevel, str], None]


def _nothing(_event: SourceEvent) -> None:
    return None


class Source:
    """Base class: a pressure signal with an open/poll/tick/close life cycle."""

    name = "source"
    period_ns: int | None = None  # sampled every period_ns when set
    #: Whether the kernel tells this source of new pressure (an fd to poll), as opposed to
    #: a sampled source that must look for it.
    reports_onset = False

    def __init__(self) -> None:
        self._emit: Emit = _nothing
        self._poller: Poller | None = None
        self.detail = ""  # what was set up, for status and probe

    # -- life cycle (called by a Poller) --------------------------------------------------
    def open(self, now_ns: int, emit: Emit) -> None:
        """Set up; raise EnvironmentProblem naming what is missing."""
        self._emit = emit

    def fds(self) -> list[tuple[int, int]]:
        """(fd, poll events) pairs to wait on."""
        return []

    def handle(self, ready: dict[int, int], now_ns: int) -> None:
        """Some of this source's fds are ready (``fd -> revents``)."""

    def tick(self, now_ns: int) -> None:
        """The sampling period elapsed."""

    @property
    def quiet(self) -> bool:
        """A sampled source that has seen nothing for a while: it may stop sampling while a
        source that :attr:`reports_onset` runs (:class:`Poller`'s ``park_quiet``)."""
        return False

    def refresh(self, now_ns: int) -> bool:
        """Another source's events are about to be handled; return whether this one sampled.

        A sampled source whose samples qualify other sources' events (PSI totals: their
        severity and confirmation) samples now if its last sample is stale.
        """
        return False

    def close(self) -> None:
        """Release everything; safe to call twice."""

    def info(self) -> dict[str, object]:
        """Source-specific state for the monitor's status."""
        return {"detail": self.detail}

    # -- standalone use -------------------------------------------------------------------
    def start(self, callback: PublicCallback, clock: Clock | None = None) -> None:
        """Run this source alone on its own daemon thread, reporting ``(level, name)``."""
        if self._poller is not None:
            raise RuntimeError(f"{self.name} is running already")

        def forward(event: SourceEvent) -> None:
            if event.level is not None:
                callback(event.level, event.source)

        poller = Poller([self], forward, clock=clock)
        failures = poller.start()
        if failures:
            raise EnvironmentProblem(f"{self.name}: {failures[self.name]}")
        self._poller = poller

    def stop(self) -> None:
        """Stop a source started with :meth:`start`."""
        if self._poller is not None:
            self._poller.stop()
            self._poller = None


def read_psi_fd(fd: int) -> PsiSample:
    """Read a PSI file through an open fd (from offset 0, as many times as wanted)."""
    return parse_psi(os.pread(fd, 4096, 0).decode())


def read_psi(path: str) -> PsiSample:
    """Read and parse a PSI file."""
    with open(path) as f:
        return parse_psi(f.read())


# ------------------------------------------------------------------------------------------
class PsiTriggerSource(Source):
    """PSI triggers on a pressure file, watched with ``poll(POLLPRI)``.

    Three triggers give three levels (see :mod:`~blkback.pressure.psi`). The privileged form
    (1 s windows) is tried first; when the kernel refuses it (EINVAL/EPERM: no
    CAP_SYS_RESOURCE), the unprivileged form (windows of 2 s, NUL-terminated) is used.
    ``form`` says which one was accepted.

    A trigger may fire once right after it is armed without any stall (bun#42784): the
    first event of each trigger is dropped unless the file's ``total`` of that trigger's
    kind grew since arming (counted in ``dropped_first``).
    """

    reports_onset = True

    def __init__(
        self,
        path: str = GLOBAL_PSI_MEMORY,
        name: str = "psi-trigger",
        *,
        forms: tuple[tuple[str, tuple[TriggerSpec, ...]], ...] | None = None,
    ) -> None:
        super().__init__()
        self.path = path
        self.name = name
        self.forms = forms or (
            ("privileged", PRIVILEGED_TRIGGERS),
            ("unprivileged", UNPRIVILEGED_TRIGGERS),
        )
        self.form: str | None = None
        self._fds: dict[int, TriggerSpec] = {}
        self._armed_total: dict[int, int] = {}  # fd -> total at arming, until first event
        self.dropped_first = 0
        self.fired = 0

    def open(self, now_ns: int, emit: Emit) -> None:
        super().open(now_ns, emit)
        if not os.path.exists(self.path):
            raise EnvironmentProblem(f"{self.path} does not exist (kernel without PSI?)")
        refusals: list[str] = []
        for form, specs in self.forms:
            try:
                self._arm(specs)
            except OSError as exc:
                self.close()
                written = specs[0].text().rstrip(b"\0").decode()
                refusals.append(f"{form} ('{written}'): {os.strerror(exc.errno or 0)}")
                if exc.errno in (errno.EINVAL, errno.EPERM, errno.EACCES):
                    continue
                raise EnvironmentProblem(f"{self.path}: " + "; ".join(refusals)) from None
            self.form = form
            windows = sorted({s.window_us // 1000 for s in specs})
            self.detail = (
                f"{self.path}: {form} triggers "
                + ", ".join(
                    f"{s.level.name.lower()}={s.kind} {s.stall_us // 1000}ms" for s in specs
                )
                + f" per {'/'.join(str(w) for w in windows)} ms window"
                + (f" (refused: {'; '.join(refusals)})" if refusals else "")
            )
            return
        raise EnvironmentProblem(f"{self.path}: every trigger form refused: " + "; ".join(refusals))

    def _arm(self, specs: tuple[TriggerSpec, ...]) -> None:
        sample = read_psi(self.path)
        for spec in specs:
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            self._fds[fd] = spec
            os.write(fd, spec.text())
            self._armed_total[fd] = _total(sample, spec.kind)

    def fds(self) -> list[tuple[int, int]]:
        return [(fd, select.POLLPRI) for fd in self._fds]

    def handle(self, ready: dict[int, int], now_ns: int) -> None:
        best: PressureLevel | None = None
        fired = 0
        sample: PsiSample | None = None
        for fd, revents in ready.items():
            spec = self._fds.get(fd)
            if spec is None or not revents & select.POLLPRI:
                continue
            armed = self._armed_total.pop(fd, None)
            if armed is not None:
                if sample is None:
                    sample = read_psi_fd(fd)
                if _total(sample, spec.kind) <= armed:
                    self.dropped_first += 1
                    continue
            fired += 1
            if best is None or spec.level > best:
                best = spec.level
        if best is not None:
            self.fired += fired
            self._emit(SourceEvent(self.name, best, now_ns, count=fired))

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self._armed_total.clear()

    def info(self) -> dict[str, object]:
        return {"detail": self.detail, "form": self.form, "dropped_first": self.dropped_first}


def _total(sample: PsiSample, kind: str) -> int:
    if kind == "full":
        return sample.full.total_us if sample.full is not None else 0
    return sample.some.total_us


# ------------------------------------------------------------------------------------------
class PsiTotalSource(Source):
    """Polls a PSI file's ``total`` counters every ``period_ns`` (default 50 ms).

    Each sample grades the stall fractions of the elapsed period with
    :class:`~blkback.pressure.psi.PsiThresholds` and is reported as a *severity* sample,
    including when it measured nothing (level None): this is what tells the fusion that
    pressure has ended. Needs no privilege.

    Quiet hosts: after ``quiet_after_ns`` of samples without any stall, the source samples
    every ``quiet_period_ns`` instead (default 250 ms, the fusion's freshness window), and
    back every ``period_ns`` from the first sample that sees a stall. Each wake-up of the
    poll thread costs ~0.2-0.25 ms of CPU on this machine against ~8 us for the sample
    itself, so the idle monitor costs about a third of what it did. While quiet, any other
    source's event first takes a sample (:meth:`refresh`) when the last is older than
    ``period_ns``: the fusion then grades and confirms that event on a sample as fresh as
    at 50 ms.
    """

    period_ns: int

    def __init__(
        self,
        path: str = GLOBAL_PSI_MEMORY,
        name: str = "psi-total",
        *,
        period_ns: int = 50 * NS_PER_MS,
        quiet_period_ns: int = 250 * NS_PER_MS,
        quiet_after_ns: int = NS_PER_S,
        thresholds: PsiThresholds | None = None,
    ) -> None:
        super().__init__()
        if period_ns <= 0 or quiet_period_ns <= 0 or quiet_after_ns < 0:
            raise ValueError("PSI sampling periods must be > 0 (quiet_after_ns >= 0)")
        self.path = path
        self.name = name
        self.busy_period_ns = period_ns
        self.quiet_period_ns = max(quiet_period_ns, period_ns)
        self.quiet_after_ns = quiet_after_ns
        self.period_ns = period_ns  # the current one: busy_period_ns or quiet_period_ns
        self.thresholds = thresholds or PsiThresholds()
        self._fd: int | None = None
        self._last: PsiSample | None = None
        self._last_ns = 0
        self._last_stall_ns = 0  # the last sample that saw a stall (or the opening)
        self._quiet = False
        self.last_level: PressureLevel | None = None
        self.last_some = 0.0
        self.last_full = 0.0

    def open(self, now_ns: int, emit: Emit) -> None:
        super().open(now_ns, emit)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self._last = read_psi_fd(self._fd)
        except OSError as exc:
            self.close()
            raise EnvironmentProblem(f"{self.path}: {exc.strerror}") from None
        except ValueError as exc:
            self.close()
            raise EnvironmentProblem(f"{self.path}: unreadable PSI format: {exc}") from None
        self._last_ns = self._last_stall_ns = now_ns
        self._quiet = False
        self.period_ns = self.busy_period_ns
        self.detail = (
            f"{self.path}: total= polled every {self.busy_period_ns / NS_PER_MS:g} ms, "
            f"every {self.quiet_period_ns / NS_PER_MS:g} ms after "
            f"{self.quiet_after_ns / NS_PER_S:g} s without stall"
        )

    def tick(self, now_ns: int) -> None:
        if self._fd is None or self._last is None:
            return
        sample = read_psi_fd(self._fd)
        some, full = stall_fractions(self._last, sample, now_ns - self._last_ns)
        self._last = sample
        self._last_ns = now_ns
        stalled = bool(some or full)
        if stalled:
            self._last_stall_ns = now_ns
        self._quiet = not stalled and now_ns - self._last_stall_ns >= self.quiet_after_ns
        self.period_ns = self.quiet_period_ns if self._quiet else self.busy_period_ns
        level = self.thresholds.level(some, full)
        self.last_level, self.last_some, self.last_full = level, some, full
        self._emit(SourceEvent(self.name, level, now_ns, severity=True, some=some, full=full))

    @property
    def quiet(self) -> bool:
        return self._quiet

    def refresh(self, now_ns: int) -> bool:
        if self.period_ns == self.busy_period_ns or now_ns - self._last_ns < self.busy_period_ns:
            return False  # sampling fast anyway, or the last sample is fresh enough
        self.tick(now_ns)
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def info(self) -> dict[str, object]:
        return {
            "detail": self.detail,
            "period_ms": self.period_ns / NS_PER_MS,
            "level": None if self.last_level is None else self.last_level.name.lower(),
            "some": round(self.last_some, 4),
            "full": round(self.last_full, 4),
        }


# ------------------------------------------------------------------------------------------
VMPRESSURE_LEVELS: tuple[PressureLevel, ...] = (
    PressureLevel.LOW,
    PressureLevel.MEDIUM,
    PressureLevel.CRITICAL,
)


class VmpressureSource(Source):
    """cgroup v1 ``memory.pressure_level`` notifications, one eventfd per level.

    Registers ``"<eventfd> <fd of memory.pressure_level> <level>"`` in the cgroup's
    ``cgroup.event_control`` for low, medium and critical. A listener is signalled for every
    event at its level or higher, so a batch of ready eventfds reports its highest level;
    ``count`` is that eventfd's counter (the kernel events folded in since the last read).
    """

    name = "vmpressure"
    reports_onset = True

    def __init__(self, cgroup_dir: str, *, mode: str = "") -> None:
        super().__init__()
        self.cgroup_dir = cgroup_dir
        self.mode = mode  # "" (default propagation), "hierarchy" or "local"
        self._level_fd: int | None = None
        self._control_fd: int | None = None
        self._efds: dict[int, PressureLevel] = {}
        self.kernel_events = 0

    def open(self, now_ns: int, emit: Emit) -> None:
        super().open(now_ns, emit)
        level_path = os.path.join(self.cgroup_dir, "memory.pressure_level")
        control_path = os.path.join(self.cgroup_dir, "cgroup.event_control")
        try:
            self._level_fd = os.open(level_path, os.O_RDONLY | os.O_CLOEXEC)
            self._control_fd = os.open(control_path, os.O_WRONLY | os.O_CLOEXEC)
            for level in VMPRESSURE_LEVELS:
                efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._efds[efd] = level
                arg = level.name.lower() + (f",{self.mode}" if self.mode else "")
                os.write(self._control_fd, f"{efd} {self._level_fd} {arg}".encode())
        except OSError as exc:
            self.close()
            raise EnvironmentProblem(
                f"cannot register vmpressure in {self.cgroup_dir}: "
                f"{exc.filename or 'cgroup.event_control'}: {exc.strerror}"
            ) from None
        self.detail = f"{self.cgroup_dir}: eventfds for low, medium, critical"

    def fds(self) -> list[tuple[int, int]]:
        return [(fd, select.POLLIN) for fd in self._efds]

    def handle(self, ready: dict[int, int], now_ns: int) -> None:
        best: PressureLevel | None = None
        best_count = 0
        for fd, revents in ready.items():
            level = self._efds.get(fd)
            if level is None or not revents & select.POLLIN:
                continue
            try:
                count = os.eventfd_read(fd)
            except BlockingIOError:
                continue
            if best is None or level > best:
                best, best_count = level, count
        if best is not None:
            self.kernel_events += best_count
            self._emit(SourceEvent(self.name, best, now_ns, count=best_count))

    def close(self) -> None:
        for fd in self._efds:
            os.close(fd)
        self._efds.clear()
        for other in (self._level_fd, self._control_fd):
            if other is not None:
                os.close(other)
        self._level_fd = self._control_fd = None

    def info(self) -> dict[str, object]:
        return {"detail": self.detail, "kernel_events": self.kernel_events}


# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AvailableThresholds:
    """Available memory as a fraction of the total, per level (Chromium's shape).

    Defaults: *low* under 20 % available, *medium* under 10 %, *critical* under 5 %
    (Chromium uses 25 % / 15 % over a 5 s sample; we sample faster and so stay a little
    lower to avoid flapping on page-cache churn).
    """

    low: float = 0.20
    medium: float = 0.10
    critical: float = 0.05

    def level(self, available_frac: float) -> PressureLevel | None:
        """The level of an available fraction, or None when there is enough."""
        if available_frac < self.critical:
            return PressureLevel.CRITICAL
        if available_frac < self.medium:
            return PressureLevel.MEDIUM
        if available_frac < self.low:
            return PressureLevel.LOW
        return None


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` to bytes by field name."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if not parts:
            continue
        value = int(parts[0])
        if len(parts) > 1 and parts[1] == "kB":
            value *= 1024
        out[key.strip()] = value
    return out


def parse_memory_stat(text: str) -> dict[str, int]:
    """A cgroup ``memory.stat`` (v1 or v2) to integers by name."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def available_fraction(meminfo_text: str, cgroup_dir: str | None = None) -> tuple[float, str]:
    """The tightest available fraction: the host's, or the v1 memory cgroup's when limited.

    For a limited cgroup, available = limit - usage + inactive file pages (reclaimable
    without I/O stalls, like MemAvailable counts them).
    """
    info = parse_meminfo(meminfo_text)
    total = info.get("MemTotal", 0)
    avail = info.get("MemAvailable", info.get("MemFree", 0))
    frac = avail / total if total else 1.0
    where = "host"
    if cgroup_dir is not None:
        limit = _read_int(os.path.join(cgroup_dir, "memory.limit_in_bytes"))
        usage = _read_int(os.path.join(cgroup_dir, "memory.usage_in_bytes"))
        if limit is not None and usage is not None and 0 < limit < total:
            try:
                with open(os.path.join(cgroup_dir, "memory.stat")) as f:
                    stat = parse_memory_stat(f.read())
            except OSError:
                stat = {}
            inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
            cg_frac = max(0, limit - usage + inactive) / limit
            if cg_frac < frac:
                frac, where = cg_frac, "cgroup"
    return frac, where


class MemAvailableSource(Source):
    """Samples MemAvailable/MemTotal (and the own v1 memory cgroup's headroom when it has a
    limit below the host's memory) every ``period_ns``; the last fallback."""

    name = "meminfo"
    period_ns: int

    def __init__(
        self,
        *,
        cgroup_dir: str | None = None,
        period_ns: int = 250 * NS_PER_MS,
        thresholds: AvailableThresholds | None = None,
        meminfo_path: str = "/proc/meminfo",
    ) -> None:
        super().__init__()
        self.cgroup_dir = cgroup_dir
        self.period_ns = period_ns
        self.thresholds = thresholds or AvailableThresholds()
        self.meminfo_path = meminfo_path
        self.last_fraction = 1.0
        self.last_where = "host"

    def open(self, now_ns: int, emit: Emit) -> None:
        super().open(now_ns, emit)
        try:
            with open(self.meminfo_path) as f:
                info = parse_meminfo(f.read())
        except OSError as exc:
            raise EnvironmentProblem(f"{self.meminfo_path}: {exc.strerror}") from None
        if "MemTotal" not in info or "MemAvailable" not in info:
            raise EnvironmentProblem(f"{self.meminfo_path} lacks MemTotal/MemAvailable")
        t = self.thresholds
        self.detail = (
            f"{self.meminfo_path}"
            + (f" and {self.cgroup_dir}" if self.cgroup_dir else "")
            + f" every {self.period_ns / NS_PER_MS:g} ms; available < "
            + f"{t.low:.0%}/{t.medium:.0%}/{t.critical:.0%} = low/medium/critical"
        )

    def tick(self, now_ns: int) -> None:
        with open(self.meminfo_path) as f:
            text = f.read()
        frac, where = available_fraction(text, self.cgroup_dir)
        self.last_fraction, self.last_where = frac, where
        level = self.thresholds.level(frac)
        if level is not None:
            self._emit(SourceEvent(self.name, level, now_ns))

    def info(self) -> dict[str, object]:
        return {
            "detail": self.detail,
            "available_fraction": round(self.last_fraction, 4),
            "where": self.last_where,
        }


# ------------------------------------------------------------------------------------------
class ManualSource(Source):
    """Reports made through an API call (``blkback ctl pressure``), from the caller's thread."""

    name = "manual"

    def __init__(self, clock: Clock | None = None) -> None:
        super().__init__()
        self.clock: Clock = clock or MonotonicClock()
        self.detail = "reports made with PressureMonitor.report / ctl pressure"

    def report(self, level: PressureLevel, source: str = "manual") -> None:
        """Report ``level`` now, as ``source``."""
        self._emit(SourceEvent(source, level, self.clock.now_ns()))


# ------------------------------------------------------------------------------------------
class Poller:
    """Runs sources on one daemon thread: ``poll(2)`` on their fds, ticks on their periods.

    ``on_failure(name, reason)`` is called (from the thread) when a running source breaks:
    its fd reports an error (e.g. its cgroup was removed) or reading it raises OSError. The
    source is closed and dropped; the others go on.

    ``park_quiet``: a sampled source that is :attr:`~Source.quiet` stops sampling (is
    *parked*) while a source that :attr:`~Source.reports_onset` runs; that source's next
    event makes it sample first (:meth:`Source.refresh`), and a sample that sees a stall
    makes it sample on its period again. The thread then sleeps until the kernel reports
    something. Its price is the onset latency of the reporting sources while quiet (see
    ``docs/data-path.md`` section 2); the server asks for it.
    """

    def __init__(
        self,
        sources: list[Source],
        emit: Emit,
        *,
        clock: Clock | None = None,
        on_failure: Callable[[str, str], None] | None = None,
        thread_name: str = "blkback-pressure",
        park_quiet: bool = False,
    ) -> None:
        self.sources = list(sources)
        self.park_quiet = park_quiet
        self.parked: set[Source] = set()  # sampled sources not sampling now (park_quiet)
        self.emit = emit
        self.clock: Clock = clock or MonotonicClock()
        self.on_failure = on_failure
        self.thread_name = thread_name
        self.running: list[Source] = []
        self._thread: threading.Thread | None = None
        self._wake_fd: int | None = None
        self._stopping = False

    def start(self) -> dict[str, str]:
        """Open every source (in the caller's thread) and start the thread.

        Returns the sources that could not be opened, by name, with the reason.
        """
        if self._thread is not None:
            raise RuntimeError("poller already started")
        failures: dict[str, str] = {}
        now = self.clock.now_ns()
        for source in self.sources:
            try:
                source.open(now, self.emit)
            except EnvironmentProblem as exc:
                failures[source.name] = str(exc)
                continue
            self.running.append(source)
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return failures

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close every source."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        if self._wake_fd is not None:
            os.eventfd_write(self._wake_fd, 1)
        thread.join(timeout)
        self._thread = None
        for source in self.running:
            source.close()
        self.running = []
        if self._wake_fd is not None:
            os.close(self._wake_fd)
            self._wake_fd = None

    def _fail(self, source: Source, reason: str) -> None:
        log.warning("pressure source %s stopped: %s", source.name, reason)
        try:
            source.close()
        except OSError:
            pass
        if source in self.running:
            self.running.remove(source)
        if self.on_failure is not None:
            self.on_failure(source.name, reason)

    def _parks(self, src: Source) -> bool:
        """Whether sampled ``src`` stops sampling for now (see ``park_quiet``)."""
        return self.park_quiet and src.quiet and any(s.reports_onset for s in self.running)

    def _schedule(self, src: Source, due: dict[Source, int], after: int, now: int) -> None:
        """Set when sampled ``src`` samples next: a period after ``after`` (never in the
        past), or not at all while it is parked."""
        if self._parks(src):
            due.pop(src, None)
            self.parked.add(src)
            return
        self.parked.discard(src)
        period = src.period_ns or 0
        nxt = after + period
        due[src] = nxt if nxt > now else now + period

    def _unpark_orphans(self, due: dict[Source, int], now: int) -> None:
        """Parked sources sample again when no running source would wake them any more
        (it failed) and drop out when they failed themselves."""
        for sampler in list(self.parked):
            if sampler not in self.running:
                self.parked.discard(sampler)
            elif not self._parks(sampler):
                self._schedule(sampler, due, now, now)

    def _refresh_samplers(
        self, ready: dict[Source, dict[int, int]], now: int, due: dict[Source, int]
    ) -> bool:
        """Let sampled sources sample before the ready sources' events (:meth:`Source.refresh`);
        return whether a source failed. A source that sampled is next due a period later."""
        failed = False
        for src in list(self.running):
            if src in ready or src.period_ns is None:
                continue
            try:
                sampled = src.refresh(now)
            except (OSError, ValueError) as exc:
                self._fail(src, f"read failed: {exc}")
                failed = True
                continue
            if sampled:
                self._schedule(src, due, now, now)
        return failed

    def _run(self) -> None:
        assert self._wake_fd is not None
        wake_fd = self._wake_fd
        now = self.clock.now_ns()
        due: dict[Source, int] = {
            s: now + s.period_ns for s in self.running if s.period_ns is not None
        }
        while not self._stopping:
            self._unpark_orphans(due, self.clock.now_ns())
            poller = select.poll()
            poller.register(wake_fd, select.POLLIN)
            owner: dict[int, Source] = {}
            for source in self.running:
                for fd, mask in source.fds():
                    poller.register(fd, mask)
                    owner[fd] = source
            now = self.clock.now_ns()
            timeout_ms: float | None = None
            live_due = [t for s, t in due.items() if s in self.running]
            if live_due:
                timeout_ms = max(0.0, (min(live_due) - now) / NS_PER_MS)
            # Re-register only when the set of sources changes: poll objects are cheap,
            # but re-building per batch keeps the loop simple; inner loop handles storms.
            while not self._stopping:
                events = poller.poll(timeout_ms)
                now = self.clock.now_ns()
                ready: dict[Source, dict[int, int]] = {}
                for fd, revents in events:
                    if fd == wake_fd:
                        try:
                            os.eventfd_read(wake_fd)
                        except BlockingIOError:
                            pass
                        continue
                    src = owner.get(fd)
                    if src is not None:
                        ready.setdefault(src, {})[fd] = revents
                changed = False
                if ready:
                    changed = self._refresh_samplers(ready, now, due)
                for src, fds in ready.items():
                    bad = [r for r in fds.values() if r & (select.POLLERR | select.POLLNVAL)]
                    if bad:
                        self._fail(src, "its file descriptor reported an error")
                        changed = True
                        continue
                    try:
                        src.handle(fds, now)
                    except (OSError, ValueError) as exc:
                        self._fail(src, f"read failed: {exc}")
                        changed = True
                for src, when in list(due.items()):
                    if src not in self.running:
                        del due[src]
                        continue
                    if now >= when:
                        try:
                            src.tick(now)
                        except (OSError, ValueError) as exc:
                            self._fail(src, f"read failed: {exc}")
                            changed = True
                            continue
                        self._schedule(src, due, when, now)
                if changed:
                    break
                live_due = list(due.values())
                timeout_ms = (
                    max(0.0, (min(live_due) - self.clock.now_ns()) / NS_PER_MS)
                    if live_due
                    else None
                )
