"""What the server tells its operator: one function per event, called from one line each.

Levels, as ``blkback -v serve`` / ``-vv`` show them (nbdkit ``-v`` is the model):

* WARNING (always): storage I/O errors returned to a client (rate-limited).
* INFO (``-v``): a line per connection once its export is chosen (peer, export, TLS or
  not), per refused export name, per connection closed (its requests and bytes), per error
  returned to a client (rate-limited), per squeeze (device, level, pages freed).
* DEBUG (``-vv``): every request (command, offset, length, flags) and every pressure report.

The call sites live in ``connection.py`` and ``server.py``; the wording lives here.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from blkback.clock import NS_PER_S, Clock, MonotonicClock
from blkback.protocol.constants import Cmd, CmdFlag

if TYPE_CHECKING:
    from blkback.core.device import Bus
    from blkback.core.policy import PressureLevel
    from blkback.core.ring import Ring
    from blkback.protocol.handshake import ExportCatalog, ExportInfo, Negotiated
    from blkback.server.exports import Export

log = logging.getLogger("blkback.server")

#: Errors that mean the storage failed (an operator's business even without ``-v``); the
#: others are the client's own mistakes (out of range, read-only, unsupported flags).
STORAGE_ERRNOS = frozenset({errno.EIO, errno.ENOSPC, errno.ENOMEM, errno.EDQUOT})


def tracing() -> bool:
    """Whether request-level lines are wanted (``-vv``): decided once per connection."""
    return log.isEnabledFor(logging.DEBUG)


class RateLimit:
    """At most ``burst`` lines at once and ``per_s`` lines a second after that; the next
    line let through says how many were dropped meanwhile (the kernel's printk_ratelimit)."""

    def __init__(self, burst: int = 10, per_s: float = 1.0, clock: Clock | None = None) -> None:
        self.burst = burst
        self.per_s = per_s
        self.clock: Clock = clock or MonotonicClock()
        self.tokens = float(burst)
        self.stamp_ns = self.clock.now_ns()
        self.dropped = 0
        self.lock = threading.Lock()

    def admit(self) -> int | None:
        """None: drop this line. Otherwise the number of lines dropped before it."""
        with self.lock:
            now_ns = self.clock.now_ns()
            elapsed_s = (now_ns - self.stamp_ns) / NS_PER_S
            self.tokens = min(self.burst, self.tokens + elapsed_s * self.per_s)
            self.stamp_ns = now_ns
            if self.tokens < 1:
                self.dropped += 1
                return None
            self.tokens -= 1
            dropped, self.dropped = self.dropped, 0
            return dropped


_error_limit = RateLimit()


def _cmd_name(cmd: int) -> str:
    try:
        return Cmd(cmd).name.lower().replace("_", "-")
    except ValueError:
        return f"command {cmd}"


class RefusalLog:
    """The server's export catalog as the handshake sees it, logging names it does not know.

    Every refusal of a name (``OPT_GO``, ``OPT_INFO``, ``OPT_EXPORT_NAME``, meta-context
    queries) goes through ``lookup``, so this is the one place that sees them all.
    """

    def __init__(self, catalog: ExportCatalog, peer: str) -> None:
        self.catalog = catalog
        self.peer = peer
        self.refused: set[str] = set()

    def lookup(self, name: str) -> ExportInfo | None:
        """The export, or None (and a log line, once per name) for an unknown name."""
        export = self.catalog.lookup(name)
        if export is None and name not in self.refused:
            self.refused.add(name)
            log.info(
                "%s: refused unknown export %r (exports: %s)",
                self.peer,
                name,
                ", ".join(self.catalog.names()),
            )
        return export

    def names(self) -> list[str]:
        """Every export's name."""
        return self.catalog.names()


def started(addresses: Iterable[str], exports: Iterable[Export], log_stats: bool) -> None:
    """The server listens: where, and what each export is made of."""
    log.info("listening on %s", ", ".join(addresses))
    for export in exports:
        log.info("export %r: %r", export.name, export.storage)
    if log_stats:
        param_changed("log_stats", False, True)


def param_changed(name: str, old: object, new: object) -> None:
    """A parameter listener: say where ``log_stats`` lines go if nobody would see them."""
    if name == "log_stats" and new and not log.isEnabledFor(logging.INFO):
        log.warning("log_stats is on, but its lines are INFO: they show with 'serve -v'")


def connected(peer: str, neg: Negotiated) -> None:
    """A client chose its export: the transmission phase begins."""
    log.info(
        "%s: connected to export %r (%s, %s replies)",
        peer,
        neg.export.name,
        "TLS" if neg.tls else "no TLS",
        "structured" if neg.structured_replies else "simple",
    )


def closed(peer: str, export: Export | None, ring: Ring | None) -> None:
    """A connection ends, for whatever reason (called before its ring is removed)."""
    if export is None or ring is None:
        log.debug("%s: closed before choosing an export", peer)
        return
    s = ring.stats
    log.info(
        "%s: closed (export %r: %d reads, %d writes, %d flushes, %d trims, %d errors; "
        "%d bytes read, %d written)",
        peer,
        export.name,
        s.rd_req,
        s.wr_req,
        s.f_req,
        s.ds_req,
        s.errors,
        s.rd_bytes,
        s.wr_bytes,
    )


def error_reply(
    peer: str, err: int, message: str, cmd: int | None = None, offset: int = 0, length: int = 0
) -> None:
    """An error is being returned to the client: WARNING for storage failures, INFO for the
    client's own mistakes; at most a few lines a second in all (rate-limited)."""
    level = logging.WARNING if err in STORAGE_ERRNOS else logging.INFO
    if not log.isEnabledFor(level):
        return
    dropped = _error_limit.admit()
    if dropped is None:
        return
    what = "request" if cmd is None else f"{_cmd_name(cmd)} {offset}+{length}"
    suffix = f" ({dropped} more error lines dropped before this one)" if dropped else ""
    name = errno.errorcode.get(err, str(err))
    log.log(level, "%s: %s answered %s: %s%s", peer, what, name, message, suffix)


def _flag_names(flags: int) -> str:
    known = CmdFlag(flags & sum(CmdFlag))
    names = [f.name.lower().replace("_", "-") for f in CmdFlag if f in known and f.name]
    unknown = flags & ~sum(CmdFlag)
    return ",".join(names + ([f"{unknown:#x}"] if unknown else []))


def request(peer: str, cmd: int, flags: int, offset: int, length: int) -> None:
    """One request as it arrives (``-vv``): command, offset+length, flags by name."""
    shown = f" [{_flag_names(flags)}]" if flags else ""
    log.debug("%s: %s %d+%d%s", peer, _cmd_name(cmd), offset, length, shown)


def squeeze_counts(bus: Bus) -> dict[str, tuple[int, int]]:
    """Per device: squeeze windows started and pages freed by squeezes so far."""
    return {
        name: (dev.squeezes, sum(r.stats.pages_squeezed for r in dev.rings))
        for name, dev in bus.devices.items()
    }


def squeezed(
    before: Mapping[str, tuple[int, int]],
    after: Mapping[str, tuple[int, int]],
    level: PressureLevel,
    source: str,
    wake: bool,
) -> None:
    """A pressure report was delivered: a line per device whose squeeze it started."""
    log.debug("pressure report: %s from %s", level.name.lower(), source)
    for name, (squeezes, freed) in after.items():
        old_squeezes, old_freed = before.get(name, (squeezes, freed))
        if squeezes == old_squeezes:
            continue
        how = (
            f"{freed - old_freed} pages freed"
            if wake
            else "pages freed at each ring's next pass (squeeze_wake=0)"
        )
        log.info(
            "squeeze: device %r, level %s (from %s), %s", name, level.name.lower(), source, how
        )
