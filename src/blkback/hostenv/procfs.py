"""Reading memory facts from ``/proc``: swap traffic and one process's memory."""

from __future__ import annotations

from dataclasses import dataclass


def read_vmstat(path: str = "/proc/vmstat") -> dict[str, int]:
    """``/proc/vmstat`` as a dict of counters."""
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            name, _, value = line.partition(" ")
            try:
                out[name] = int(value)
            except ValueError:
                continue
    return out


@dataclass(frozen=True, slots=True)
class SwapCounters:
    """Pages swapped in and out since boot (``pswpin``/``pswpout``)."""

    pswpin: int
    pswpout: int

    def __sub__(self, other: SwapCounters) -> SwapCounters:
        return SwapCounters(self.pswpin - other.pswpin, self.pswpout - other.pswpout)


def swap_counters(path: str = "/proc/vmstat") -> SwapCounters:
    """The host's swap traffic counters now."""
    vm = read_vmstat(path)
    return SwapCounters(vm.get("pswpin", 0), vm.get("pswpout", 0))


def parse_status(text: str) -> dict[str, int]:
    """The ``kB`` fields of a ``/proc/<pid>/status`` text, in bytes (VmRSS, RssAnon, VmSwap...)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def process_memory(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS``, ``RssAnon``, ``RssFile``, ``VmSwap``... of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return parse_status(f.read())
