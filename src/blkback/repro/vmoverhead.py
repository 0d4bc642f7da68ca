"""Experiment 3 inside a real guest (``--guests vm``): the seed's dd loop on the guest's ext4.

One VM whose single virtual disk (virtio-blk, QEMU's NBD client) is a blkback ``memory``
export, ``rate=40M`` for the seed's ~40 MB/s volume and unfiltered for fast storage. The
guest makes ext4 on it with its own ``mke2fs`` and mounts it; then, for ``max_buffer_pages``
1024 and 0, set on the host through the control socket as the seed wrote the module
parameter, it runs the seed's loop (``ddloop.sh``) and its dd lines come back as dd printed
them. The compared figure is bytes / (dd + sync) by the guest's clock, as on the host.
The server and the VM are outside the memory-limited cgroup, as in the host variant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blkback.repro.overhead import dd_record, log_dd, log_loop_header, pool_totals
from blkback.repro.testbed import ServerProcess
from blkback.repro.vm import Vm, nbd_uri
from blkback.repro.vmguests import VmSetup

# e2fsprogs' mke2fs by its path: busybox's shell would run its own applet (no ext4).
MKFS = "/sbin/mke2fs -t ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/vda"


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


def run_volume_vm(
    kind: str,
    workdir: Path,
    setup: VmSetup,
    *,
    runs: int,
    count: int,
    size: str,
    rate: str,
    settings: tuple[int, ...] = (1024, 0),
    log: Any = None,
    on_step: Any = None,
) -> dict[str, Any]:
    """One volume in one guest: mkfs + mount, then the dd loop per setting."""
    spec = f"memory:{size}" + (f",rate={rate}" if kind == "slow" else "")
    wd = workdir / f"overhead-vm-{kind}"
    wd.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"export": spec, "runs": {}, "pools": {}, "where": "vm"}
    server = ServerProcess(wd, [f"disk={spec}"], workers=16, pressure="off", tag="srv")
    try:
        vm = Vm(
            setup.image,
            [nbd_uri(server.sock, "disk")],
            wd,
            accel=setup.accel.name,
            tag=f"dd-{kind}",
            memory_mib=setup.memory_mib,
        )
        try:
            vm.wait_ready()
            vm.run(f"{MKFS} && mount -t ext4 /dev/vda /mnt", timeout_s=300)
            for setting in settings:
                if on_step is not None:
                    on_step(f"overhead {kind} (vm): max_buffer_pages={setting}")
                server.set("max_buffer_pages", setting)
                if log is not None:
                    log_loop_header(kind, setting, runs, count, log)
                before = pool_totals(server.stats())
                out = vm.run(f"ddloop.sh /mnt {runs} {count}", timeout_s=runs * 600)
                loop = parse_loop(out, count * 4096)
                if len(loop) != runs:
                    raise RuntimeError(f"dd loop in the guest: {runs} runs expected: {out[-5:]}")
                for run in loop:
                    if log is not None:
                        log_dd(run, log)
                result["runs"][str(setting)] = loop
                after = pool_totals(server.stats())
                result["pools"][str(setting)] = {k: after[k] - before[k] for k in after} | {
                    "pool_pages_end": after["pool_pages"]
                }
            vm.run("umount /mnt", timeout_s=120)
        finally:
            vm.stop()
    finally:
        server.stop()
    return result
