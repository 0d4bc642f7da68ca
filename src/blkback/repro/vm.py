"""Real guests: QEMU VMs whose virtual disks are blkback exports.

One :class:`Vm` is a ``qemu-system-x86_64`` process running the guest image
(:mod:`blkback.repro.vmimage`). Each of its virtual disks is a ``virtio-blk-pci`` device
whose drive is QEMU's own NBD client on one blkback export: one NBD connection, so one ring
and one page pool in the server per virtual disk, as blkfront has one ring per virtual
device. The default machine's bus is left alone: the disks sit behind ``pci-bridge``
devices, 32 slots each, so a guest can have 64 or more.

The host talks to the guest's ``/init`` over the second serial port (a Unix socket): it
sends one shell command per line and reads the command's output up to ``done RC``. The
first serial port is the guest's console, written to a log file next to the sockets.

Acceleration: KVM when it boots a guest here, else TCG, with the reason
(:func:`choose_accel`): on this kind of machine ``/dev/kvm`` exists but a Linux guest hangs
at boot (nested virtualisation), so the probe boots one and gives it a deadline.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from blkback.clock import NS_PER_MS, NS_PER_S, Clock
from blkback.errors import EnvironmentProblem
from blkback.repro.testbed import CLOCK, file_tail, kill_pid, missing_tools, poll_until
from blkback.repro.vmimage import GuestImage

QEMU = "qemu-system-x86_64"
DISKS_PER_BRIDGE = 32
KVM_PROBE_TIMEOUT_NS = 20 * NS_PER_S


@dataclass(frozen=True)
class Accel:
    """The accelerator the VMs use, and why."""

    name: str  # "kvm" or "tcg"
    reason: str


def nbd_uri(socket_path: str, export: str) -> str:
    return f"nbd+unix:///{export}?socket={socket_path}"


def qemu_argv(
    image: GuestImage,
    disk_uris: list[str],
    *,
    accel: str,
    memory_mib: int,
    console_log: Path,
    control_sock: Path,
    serials: list[str] | None = None,
) -> list[str]:
    """The QEMU command line: the guest image, the control port, one virtio disk per URI
    (with ``serials``, disk i shows ``serials[i]`` in the guest's /sys/block/vdX/serial)."""
    argv = [
        QEMU,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-machine",
        f"pc,accel={accel}",
        "-cpu",
        "host" if accel == "kvm" else "max",
        "-smp",
        "1",
        "-m",
        str(memory_mib),
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        # Async probing: the disks' partition scans overlap (32 disks: ~9 s -> ~5.5 s boot).
        "console=ttyS0 panic=-1 quiet driver_async_probe=virtio_blk "
        f"blkback.disks={len(disk_uris)}",
        "-chardev",
        f"file,id=con,path={console_log}",
        "-serial",
        "chardev:con",
        "-chardev",
        f"socket,id=ctl,path={control_sock},server=on,wait=on",
        "-serial",
        "chardev:ctl",
    ]
    for b in range((len(disk_uris) + DISKS_PER_BRIDGE - 1) // DISKS_PER_BRIDGE):
        argv += ["-device", f"pci-bridge,id=br{b},chassis_nr={b + 1}"]
    for i, uri in enumerate(disk_uris):
        bridge, slot = divmod(i, DISKS_PER_BRIDGE)
        serial = f",serial={serials[i]}" if serials else ""
        argv += [
            "-drive",
            f"file={uri},if=none,id=d{i},format=raw,cache=none",
            "-device",
            f"virtio-blk-pci,drive=d{i},bus=br{bridge},addr={slot:x}.0{serial}",  # slot: hex
        ]
    return argv


class Vm:
    """A running guest; :meth:`stop` (also on any failure in the constructor) ends it."""

    def __init__(
        self,
        image: GuestImage,
        disk_uris: list[str],
        workdir: Path,
        *,
        accel: str,
        tag: str,
        memory_mib: int = 256,
        serials: list[str] | None = None,
        clock: Clock = CLOCK,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.tag = tag
        self.disks = len(disk_uris)
        self.console_log = workdir / f"{tag}.console"
        self.control_sock = workdir / f"{tag}.ctl"
        self.qemu_log = workdir / f"{tag}.qemu.log"
        with contextlib.suppress(FileNotFoundError):
            self.control_sock.unlink()
        argv = qemu_argv(
            image,
            disk_uris,
            accel=accel,
            memory_mib=memory_mib,
            console_log=self.console_log,
            control_sock=self.control_sock,
            serials=serials,
        )
        self._log: IO[str] = open(self.qemu_log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        self._sock: socket.socket | None = None
        self._buf = b""
        self.ready_line = ""
        try:
            self._connect()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _connect(self, timeout_ns: int = 30 * NS_PER_S) -> None:
        """QEMU waits (``wait=on``) for us on the control socket before it starts the guest."""
        if not poll_until(
            self._try_connect, timeout_ns=timeout_ns, interval_ns=50 * NS_PER_MS, clock=self.clock
        ):
            raise EnvironmentProblem(f"{self.tag}: qemu's control socket did not appear")

    def _try_connect(self) -> bool:
        """Connect to the control socket if QEMU made it yet; an error if QEMU is gone."""
        if self.proc.poll() is not None:
            raise EnvironmentProblem(f"{self.tag}: qemu exited: {self.log_tail()}")
        if not self.control_sock.exists():
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.control_sock))
        except OSError:
            s.close()
            return False
        self._sock = s
        return True

    def wait_ready(self, timeout_ns: int = 120 * NS_PER_S) -> str:
        """Block until the guest's init reports ``ready DISKS RELEASE``; returns that line."""
        line = self.read_line(timeout_ns)
        if not line.startswith("ready "):
            raise EnvironmentProblem(f"{self.tag}: unexpected first line {line!r}")
        seen = int(line.split()[1])
        if seen != self.disks:
            raise EnvironmentProblem(f"{self.tag}: guest sees {seen} of {self.disks} disks")
        self.ready_line = line
        return line

    def read_line(self, timeout_ns: int) -> str:
        """The next line from the guest's control port (without the newline)."""
        assert self._sock is not None
        deadline = self.clock.now_ns() + timeout_ns
        while b"\n" not in self._buf:
            left_ns = deadline - self.clock.now_ns()
            if left_ns <= 0:
                raise EnvironmentProblem(
                    f"{self.tag}: guest silent for {timeout_ns / NS_PER_S:.0f} s; console: "
                    f"{self.console_tail()}"
                )
            # The socket's own timeout does the waiting (a recv, not the clock), at most 1 s
            # at a time so that a QEMU that died is noticed.
            self._sock.settimeout(min(left_ns, NS_PER_S) / NS_PER_S)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise EnvironmentProblem(
                        f"{self.tag}: qemu exited: {self.log_tail()} {self.console_tail()}"
                    ) from None
                continue
            if not chunk:
                raise EnvironmentProblem(f"{self.tag}: control port closed: {self.log_tail()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace").rstrip("\r")

    def send(self, command: str) -> None:
        """Start ``command`` in the guest (its output: :meth:`collect`)."""
        assert self._sock is not None and "\n" not in command
        self._sock.sendall(command.encode() + b"\n")

    def collect(self, timeout_ns: int) -> tuple[int, list[str]]:
        """The running command's output lines and exit status (``timeout_ns`` per line)."""
        lines: list[str] = []
        while True:
            line = self.read_line(timeout_ns)
            if line.startswith("done "):
                return int(line.split()[1]), lines
            lines.append(line)

    def run(self, command: str, timeout_ns: int = 120 * NS_PER_S) -> list[str]:
        """Run ``command`` in the guest; its output lines (an error if it failed)."""
        self.send(command)
        rc, lines = self.collect(timeout_ns)
        if rc != 0:
            raise EnvironmentProblem(f"{self.tag}: `{command}` failed ({rc}): {lines[-5:]}")
        return lines

    def stop(self) -> None:
        """Power the guest off (it syncs first), else kill QEMU by its PID; close the files."""
        if self._sock is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self._sock.sendall(b"poweroff\n")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        kill_pid(self.proc, term_timeout=5.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(OSError):
            self._log.close()
        with contextlib.suppress(FileNotFoundError):
            self.control_sock.unlink()

    def log_tail(self, n: int = 600) -> str:
        return file_tail(self.qemu_log, n)

    def console_tail(self, n: int = 600) -> str:
        return file_tail(self.console_log, n)


def choose_accel(
    image: GuestImage, workdir: Path, want: str = "auto", clock: Clock = CLOCK
) -> Accel:
    """KVM if asked or if a KVM guest boots here within the probe's deadline, else TCG."""
    if want == "tcg":
        return Accel("tcg", "TCG asked for (--accel tcg)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        if want == "kvm":
            raise EnvironmentProblem("--accel kvm: /dev/kvm is not usable")
        return Accel("tcg", "no usable /dev/kvm")
    if want == "kvm":
        return Accel("kvm", "KVM asked for (--accel kvm)")
    t0_ns = clock.now_ns()
    vm = None
    try:
        vm = Vm(image, [], workdir, accel="kvm", tag="kvm-probe", clock=clock)
        vm.wait_ready(KVM_PROBE_TIMEOUT_NS)
    except EnvironmentProblem:
        return Accel("tcg", "KVM tried first: " + _kvm_failure(workdir / "kvm-probe.qemu.log"))
    finally:
        if vm is not None:
            vm.stop()
    return Accel("kvm", f"a KVM guest booted in {(clock.now_ns() - t0_ns) / NS_PER_S:.1f} s")


def _kvm_failure(qemu_log: Path) -> str:
    """Why the KVM probe failed: QEMU's own error, else the boot deadline."""
    try:
        lines = qemu_log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [ln.strip() for ln in lines if ln.strip() and "info: QEMU waiting" not in ln]
    if errors:  # the first line says why; the rest is QEMU's assertion and abort
        return "QEMU failed (" + errors[0].removeprefix(f"{QEMU}: ")[:160] + ")"
    return (
        f"the guest did not reach its init within {KVM_PROBE_TIMEOUT_NS // NS_PER_S} s (a Linux "
        "guest hangs at boot under KVM here: nested virtualisation)"
    )


def missing_vm_facilities() -> list[str]:
    """What this host lacks for VM guests (empty when everything is there)."""
    out = missing_tools(
        {QEMU: "qemu-system-x86", "apt-get": "apt", "dpkg-deb": "dpkg", "ldd": "libc-bin"}
    )
    if not os.path.exists("/bin/busybox"):
        out.append("/bin/busybox (busybox-static)")
    return out
