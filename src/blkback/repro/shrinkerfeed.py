"""Pressure reports at the rate the kernel would call a shrinker: the seed's only signal.

The seed's patch registers a shrinker whose ``count_objects`` re-arms the squeeze deadline,
and reclaim calls every shrinker on each of its passes: in dom0 under pressure, hundreds to
thousands of times per second, so a 10 ms deadline stays armed for as long as reclaim goes
on and lapses 10 ms after it stops. blkback in userspace hears the kernel's pressure
*signals* instead (vmpressure, PSI), a few per second (see ``reclaim`` and
``pressure_monitor`` in each run of results.json): with one global deadline and no wake-up,
a 1, 10 or 100 ms window armed a few times per second is one that an idle ring's 100 ms pass
rarely meets, whatever its length, which is not the kernel's behaviour.

:class:`ShrinkerFeed` restores the kernel's cadence for the kernel-faithful configurations:
it watches dom0's ``memory.failcnt`` (one increment per charge that hit the limit, each
followed by a reclaim pass that would call the shrinker) every ``interval_ns`` and, whenever
it moved, reports pressure to the server over one control connection
(:class:`~blkback.server.control_client.ControlConnection`), as ``count_objects``
would have been called. The server then runs with ``--pressure off``: the feed is its only
signal, as the shrinker was the patch's.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from blkback.clock import NS_PER_MS, NS_PER_S, Clock
from blkback.errors import ConfigError, EnvironmentProblem
from blkback.repro.testbed import CLOCK

# The sweep's squeeze durations: a report that follows the one before within a window
# re-arms the global deadline before it lapses.
WINDOWS_MS = (1, 10, 100)


def gaps_within(gaps_ns: list[int], windows_ms: tuple[int, ...]) -> dict[str, float | None]:
    """Per window (ms): the share of gaps between consecutive reports shorter than it.

    With one global deadline of ``d`` ms re-armed at every report, that is the share of
    re-arms that keep the deadline armed without a lapse: a window that bridges most gaps
    stays armed for a whole reclaim episode (and idle rings' 100 ms passes meet it), one
    that bridges few lapses between re-arms (and the passes mostly miss it).
    """
    if not gaps_ns:
        return {str(w): None for w in windows_ms}
    return {str(w): sum(1 for g in gaps_ns if g < w * NS_PER_MS) / len(gaps_ns) for w in windows_ms}


class ShrinkerFeed:
    """A thread: poll ``failcnt_path``; on every increase, one pressure report."""

    def __init__(
        self,
        failcnt_path: str,
        control_path: str,
        *,
        interval_ns: int = NS_PER_MS,
        clock: Clock = CLOCK,
    ) -> None:
        self.failcnt_path = failcnt_path
        self.control_path = control_path
        self.interval_ns = interval_ns
        self.clock = clock
        self.polls = 0
        self.reports = 0
        self.failcnt = 0
        self.errors = 0
        self.gaps_ns: list[int] = []  # between consecutive reports
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0_ns = 0

    def start(self) -> None:
        self._t0_ns = self.clock.now_ns()
        self._thread = threading.Thread(target=self._run, name="shrinker-feed", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        """Stop and return what it did."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        seconds = (self.clock.now_ns() - self._t0_ns) / NS_PER_S
        gaps = sorted(self.gaps_ns)
        return {
            "interval_ms": self.interval_ns / NS_PER_MS,
            "seconds": seconds,
            "polls": self.polls,
            "reports": self.reports,
            "reports_per_s": self.reports / seconds if seconds else 0.0,
            "failcnt_delta": self.failcnt,
            "errors": self.errors,
            "gap_ms_median": gaps[len(gaps) // 2] / NS_PER_MS if gaps else None,
            "gap_ms_p90": gaps[int(len(gaps) * 0.9)] / NS_PER_MS if gaps else None,
            "gaps_within_ms": gaps_within(gaps, WINDOWS_MS),
        }

    def _run(self) -> None:
        from blkback.server.control_client import ControlConnection

        fd = os.open(self.failcnt_path, os.O_RDONLY)
        try:
            with ControlConnection(self.control_path) as conn:
                last = int(os.pread(fd, 64, 0))
                last_report_ns: int | None = None
                while not self.clock.wait_until(self.clock.now_ns() + self.interval_ns, self._stop):
                    now_count = int(os.pread(fd, 64, 0))
                    self.polls += 1
                    if now_count == last:
                        continue
                    self.failcnt += now_count - last
                    last = now_count
                    conn.request({"op": "pressure", "level": "medium"})
                    now_ns = self.clock.now_ns()
                    if last_report_ns is not None:
                        self.gaps_ns.append(now_ns - last_report_ns)
                    last_report_ns = now_ns
                    self.reports += 1
        except (OSError, ValueError, EnvironmentProblem, ConfigError):  # server or file gone
            self.errors += 1
        finally:
            os.close(fd)
