"""The memory-pressure test's guests as real VMs (``--guests vm``).

:class:`VmGuests` has the interface of :class:`~blkback.repro.testbed.GuestProcess` (ready
once constructed, :meth:`go`, :meth:`finish`, :meth:`stop`), so the test bed runs either.
The exports are split evenly over ``vms`` guests; every export is one virtio disk of its
guest (one NBD connection, one ring). At :meth:`go` each guest runs ``bursts.sh`` (in the
image): every disk gets one O_DIRECT burst every period, staggered, and idles in between.
The guests run outside dom0's cgroup, as Xen's guests are outside dom0.

The bursts write random bytes (:data:`PATTERN`, one burst's worth from the guest's
``/dev/urandom``, made while the guests wait for go), as the libnbd guests write random
bytes and real guests write real data. Not zeroes: since Linux 6.12 the host records the
swap-out of a zero-filled page in a bitmap, with no I/O and not in ``pswpout`` (vmstat
``swpout_zero`` instead), so pools full of zeroes would swap without showing it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blkback.clock import NS_PER_S, Clock
from blkback.repro.testbed import CLOCK, ServerProcess, median
from blkback.repro.vm import Accel, Vm, nbd_uri
from blkback.repro.vmimage import GuestImage

MIB = 1 << 20
# The guests' burst data, made once per boot in the guest's tmpfs (its RAM) before go.
PATTERN = "/tmp/pattern"


@dataclass(frozen=True)
class VmSetup:
    """Which image, accelerator and how many guests (the run's constants)."""

    image: GuestImage
    accel: Accel
    vms: int = 2
    memory_mib: int = 256


def split(names: list[str], parts: int) -> list[list[str]]:
    """``names`` in ``parts`` contiguous groups whose sizes differ by at most one."""
    parts = max(1, min(parts, len(names)))
    q, r = divmod(len(names), parts)
    out, i = [], 0
    for p in range(parts):
        n = q + (1 if p < r else 0)
        out.append(names[i : i + n])
        i += n
    return out


def parse_bursts(lines: list[str]) -> list[tuple[int, float]]:
    """``burst DISK START_CS END_CS`` lines -> (disk, seconds) per burst."""
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) == 4 and parts[0] == "burst":
            out.append((int(parts[1]), (int(parts[3]) - int(parts[2])) / 100))
    return out


class VmGuests:
    """``setup.vms`` QEMU guests whose virtual disks are the server's exports ``names``."""

    def __init__(
        self,
        server: ServerProcess,
        names: list[str],
        setup: VmSetup,
        workdir: Path,
        *,
        burst: int,
        period: float,
        seconds: float,
        clock: Clock = CLOCK,
    ) -> None:
        self.clock = clock
        self.burst_mib = max(1, burst // MIB)
        self.period_cs = round(period * 100)
        self.seconds = seconds
        self.groups = split(names, setup.vms)
        self.vms: list[Vm] = []
        t0_ns = clock.now_ns()
        try:
            # Start every QEMU (each connects its disks at once); they boot in parallel while
            # the caller goes on (wait_ready).
            for i, group in enumerate(self.groups):
                uris = [nbd_uri(server.sock, n) for n in group]
                self.vms.append(
                    Vm(
                        setup.image,
                        uris,
                        workdir,
                        accel=setup.accel.name,
                        tag=f"guest{i}",
                        memory_mib=setup.memory_mib,
                        clock=clock,
                    )
                )
        except BaseException:
            self.stop()
            raise
        self._t0_ns = t0_ns
        self.boot_s: float | None = None
        self.pattern_s: float | None = None

    def wait_ready(self) -> None:
        """Until every guest's init is up with all its disks (they boot in parallel)."""
        try:
            for vm in self.vms:
                if not vm.ready_line:
                    vm.wait_ready()
        except BaseException:
            self.stop()
            raise
        if self.boot_s is None:
            self.boot_s = (self.clock.now_ns() - self._t0_ns) / NS_PER_S
            self._make_pattern()

    def _make_pattern(self) -> None:
        """The burst data in every guest (all guests at once; before go, so not measured)."""
        t0_ns = self.clock.now_ns()
        command = f"busybox dd if=/dev/urandom of={PATTERN} bs=1M count={self.burst_mib}"
        try:
            for vm in self.vms:
                vm.send(command + " 2>/dev/null")
            for vm in self.vms:
                rc, lines = vm.collect(60 * NS_PER_S)
                if rc != 0:
                    raise RuntimeError(f"{vm.tag}: `{command}` failed ({rc}): {lines[-3:]}")
        except BaseException:
            self.stop()
            raise
        self.pattern_s = (self.clock.now_ns() - t0_ns) / NS_PER_S

    def go(self) -> None:
        self.wait_ready()
        for vm in self.vms:
            vm.send(f"bursts.sh {self.period_cs} {self.burst_mib} {round(self.seconds)} {PATTERN}")

    def finish(self, timeout_ns: int = 120 * NS_PER_S) -> dict[str, Any]:
        """Wait for every guest's workload to end; the bursts' totals and timing."""
        per_vm: list[dict[str, Any]] = []
        durations: list[float] = []
        for vm in self.vms:
            rc, lines = vm.collect(timeout_ns)
            bursts = parse_bursts(lines)
            durations += [s for _, s in bursts]
            per_vm.append({"tag": vm.tag, "disks": vm.disks, "bursts": len(bursts), "rc": rc})
        self.stop()
        durations.sort()
        n = len(durations)
        return {
            "kind": "vm",
            "vms": len(self.vms),
            "connections": sum(vm.disks for vm in self.vms),
            "bursts": n,
            "bytes": n * self.burst_mib * MIB,
            "errors": sum(1 for v in per_vm if v["rc"] != 0),
            "seconds": self.seconds,
            "boot_s": self.boot_s,
            "pattern_s": self.pattern_s,
            "data": f"random bytes ({self.burst_mib} MiB from the guest's /dev/urandom, made "
            "before go)",
            "burst_s_median": median(durations) if durations else None,
            "burst_s_p95": durations[int(n * 0.95)] if durations else None,
            "burst_s_max": durations[-1] if durations else None,
            "per_vm": per_vm,
        }

    def stop(self) -> None:
        for vm in self.vms:
            with contextlib.suppress(Exception):
                vm.stop()


def vm_guests(setup: VmSetup) -> Any:
    """A :data:`~blkback.repro.memory.GuestFactory` that boots ``setup.vms`` VMs per run."""
    from blkback.repro.memory import Sizing

    def make(server: ServerProcess, names: list[str], sizing: Sizing, workdir: Path) -> VmGuests:
        # The guests' workload covers the whole measured window (it starts at go).
        return VmGuests(
            server,
            names,
            setup,
            workdir,
            burst=sizing.burst,
            period=sizing.period_s,
            seconds=sizing.seconds + 1,
        )

    return make
