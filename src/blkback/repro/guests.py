"""Which guests a repro run uses: real VMs (``--guests vm``) or libnbd programs (``nbd``).

``vm`` is the default where the host allows it: QEMU and the guest image's inputs are there
and the image builds. Otherwise the run says why, in its log and in results.json, and falls
back to ``nbd``. A ``vm`` run boots its guests under KVM if a KVM guest boots here, else TCG
(:func:`blkback.repro.vm.choose_accel`), decided once per run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blkback.errors import EnvironmentProblem
from blkback.repro.vmguests import VmSetup, vm_guests

GUEST_KINDS = ("vm", "nbd")


@dataclass(frozen=True)
class GuestChoice:
    """The run's guests: ``setup`` is None for libnbd guests."""

    kind: str
    setup: VmSetup | None
    reason: str

    def factory(self) -> Any:
        """The memory test's guest factory (see :data:`blkback.repro.memory.GuestFactory`)."""
        from blkback.repro.memory import nbd_guests

        return nbd_guests if self.setup is None else vm_guests(self.setup)

    def describe(self, disks: int) -> dict[str, Any]:
        """``config.guests`` in results.json."""
        s = self.setup
        out: dict[str, Any] = {
            "kind": self.kind,
            "accel": s.accel.name if s else None,
            "vms": s.vms if s else 0,
            "disks": disks,
            "reason": self.reason,
        }
        if s is not None:
            out["accel_reason"] = s.accel.reason
            out["memory_mib"] = s.memory_mib
            out["image"] = {
                "kernel_package": s.image.kernel_package,
                "kernel_version": s.image.kernel_version,
                "key": s.image.key,
                "path": str(s.image.kernel.parent),
            }
        return out


def choose_guests(
    wanted: str | None, accel: str, vms: int, workdir: Path, log: Callable[[str], None]
) -> GuestChoice:
    """VM guests if wanted (or by default) and possible; libnbd guests otherwise, with why."""
    from blkback.repro.vm import choose_accel, missing_vm_facilities
    from blkback.repro.vmimage import ensure_image

    if wanted == "nbd":
        return GuestChoice("nbd", None, "--guests nbd")
    missing = missing_vm_facilities()
    problem = "this host lacks: " + "; ".join(missing) if missing else ""
    image = None
    if not problem:
        try:
            image = ensure_image(log=log)
        except EnvironmentProblem as exc:
            problem = str(exc)
    if image is None:
        if wanted == "vm":
            raise EnvironmentProblem(f"--guests vm: {problem}")
        log(f"repro: VM guests impossible here ({problem}); libnbd guests instead")
        return GuestChoice("nbd", None, f"VM guests impossible: {problem}")
    chosen = choose_accel(image, workdir / "accel-probe", accel)
    log(f"repro: VM guests, {image.describe()}, {chosen.name}: {chosen.reason}")
    reason = "--guests vm" if wanted == "vm" else "default (VM guests possible here)"
    return GuestChoice("vm", VmSetup(image, chosen, vms=vms), reason)
