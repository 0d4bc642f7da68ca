"""Experiment 3 inside a real guest (``--guests vm``): the seed's dd loop on the guest's ext4.

One VM with two virtual disks (virtio-blk, QEMU's NBD client), each a blkback ``memory``
export of one server: ``slow`` with ``rate=40M`` (the seed's ~40 MB/s volume) and ``fast``
unfiltered. The guest finds each by its virtio serial, makes ext4 on it with its own
``mke2fs`` and mounts it; then, per volume and for ``max_buffer_pages`` 1024 and 0, set on
the host through the control socket as the seed wrote the module parameter, it runs the
seed's loop (``ddloop.sh``) and its dd lines come back as dd printed them. The compared
figure is bytes / (dd + sync) by the guest's clock, as on the host. The server and the VM
are outside the memory-limited cgroup, as in the host variant.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from blkback.clock import NS_PER_S
from blkback.repro.overhead import OverheadPlan, dd_record, log_dd, measure_setting
from blkback.repro.testbed import ServerProcess
from blkback.repro.vm import Vm, nbd_uri
from blkback.repro.vmguests import VmSetup

KINDS = ("slow", "fast")
# e2fsprogs' mke2fs by its path: busybox's shell would run its own applet (no ext4).
MKFS = "/sbin/mke2fs -t ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0"


def parse_loop(output: list[str], nbytes: int) -> list[dict[str, Any]]:
    """ddloop.sh's output -> one :func:`dd_record` per run (dd's lines up to ``ddsync``)."""
    runs: list[dict[str, Any]] = []
    pending: list[str] = []
    for line in output:
        if line.startswith("ddsync "):
            t0, t1, t2 = (float(x) for x in line.split()[1:4])
            runs.append(dd_record(pending, nbytes, dd_wall_s=t1 - t0, total_s=t2 - t0))
            pending = []
        else:
            pending.append(line)
    return runs


def mount_by_serial(serial: str) -> str:
    """Guest shell: ext4 on the virtio disk whose serial is ``serial``, at /mnt/SERIAL."""
    return (
        f'for d in /sys/block/vd*; do [ "$(cat $d/serial)" = {serial} ] && '
        f'dev=/dev/${{d##*/}}; done; [ -n "$dev" ] && {MKFS} $dev && '
        f"mkdir -p /mnt/{serial} && mount -t ext4 $dev /mnt/{serial}"
    )


def run_volumes_vm(workdir: Path, setup: VmSetup, plan: OverheadPlan) -> dict[str, dict[str, Any]]:
    """Both volumes in one guest: mkfs + mount, then per volume the dd loop per setting."""
    specs = {kind: plan.export(kind) for kind in KINDS}
    wd = workdir / "overhead-vm"
    wd.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {
        kind: {"export": specs[kind], "runs": {}, "pools": {}, "where": "vm"} for kind in KINDS
    }
    server = ServerProcess(
        wd,
        [f"{k}={specs[k]}" for k in KINDS],
        workers=16,
        pressure="off",
        tag="srv",
        clock=plan.clock,
    )
    try:
        vm = Vm(
            setup.image,
            [nbd_uri(server.sock, k) for k in KINDS],
            wd,
            accel=setup.accel.name,
            tag="dd-guest",
            memory_mib=setup.memory_mib,
            serials=list(KINDS),
            clock=plan.clock,
        )
        try:
            vm.wait_ready()
            for kind in KINDS:
                vm.run(mount_by_serial(kind), timeout_ns=300 * NS_PER_S)
            for kind in KINDS:
                for setting in plan.settings:
                    plan.step(f"overhead {kind} (vm): max_buffer_pages={setting}")
                    done, pools = measure_setting(
                        server, plan, kind, setting, functools.partial(_guest_loop, vm, kind, plan)
                    )
                    results[kind]["runs"][str(setting)] = done
                    results[kind]["pools"][str(setting)] = pools
            vm.run("umount /mnt/slow /mnt/fast", timeout_ns=120 * NS_PER_S)
        finally:
            vm.stop()
    finally:
        server.stop()
    return results


def _guest_loop(vm: Vm, kind: str, plan: OverheadPlan) -> list[dict[str, Any]]:
    """The seed's loop in the guest on volume ``kind``; its dd lines parsed (and logged)."""
    runs, count = plan.runs, plan.count
    out = vm.run(f"ddloop.sh /mnt/{kind} {runs} {count}", timeout_ns=runs * 600 * NS_PER_S)
    loop = parse_loop(out, count * 4096)
    if len(loop) != runs:
        raise RuntimeError(f"dd loop in the guest: {runs} runs expected: {out[-5:]}")
    if plan.log is not None:
        for run in loop:
            log_dd(run, plan.log)
    return loop
