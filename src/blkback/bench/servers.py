"""Start, probe, account and stop one NBD server process.

Every server listens on a Unix socket in the bench's temporary directory. The bench starts it,
waits until the socket accepts a connection (the readiness signal for all three programs), and
stops it with SIGTERM (SIGKILL after a grace period). It only ever signals the PIDs it started;
children also get ``PR_SET_PDEATHSIG`` so that a killed bench does not leave servers behind.

Server CPU is read from ``/proc/PID/stat`` (utime + stime of the whole process, all threads).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import blkback
from blkback.clock import NS_PER_MS, NS_PER_S, MonotonicClock
from blkback.errors import BlkbackError

#: Export name of blkback's memory export; nbdkit and qemu-nbd serve the default name "".
BLKBACK_EXPORT = "disk"

_PR_SET_PDEATHSIG = 1
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(BlkbackError):
    """A server or fio failed in a way that stops the bench (message shown as is)."""


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """How to run one server under test.

    Attributes:
        name: key used on the command line (``--servers``) and in the output.
        kind: ``"blkback"``, ``"nbdkit"`` or ``"qemu-nbd"``.
        description: one line for the report.
        params: blkback ``--param NAME=VALUE`` settings.
        threads: nbdkit ``--threads``; None keeps nbdkit's default (16).
        serve_args: more ``blkback serve`` options.
        pressure: send one ``blkback ctl pressure`` after start (the permanent squeeze).
        price_only: run only the pool-price workloads.
    """

    name: str
    kind: str
    description: str
    params: tuple[tuple[str, str], ...] = ()
    threads: int | None = None
    pressure: bool = False
    price_only: bool = False
    serve_args: tuple[str, ...] = ()


SERVERS: dict[str, ServerSpec] = {
    s.name: s
    for s in (
        ServerSpec("blkback", "blkback", "blkback memory export, default params"),
        ServerSpec(
            "blkback-nopoll",
            "blkback",
            "blkback, busy polling off (serve --poll-us 0; the default polls adaptively)",
            serve_args=("--poll-us", "0"),
        ),
        ServerSpec("nbdkit", "nbdkit", "nbdkit memory plugin, default threads"),
        ServerSpec("nbdkit-t1", "nbdkit", "nbdkit memory plugin, --threads 1", threads=1),
        ServerSpec("qemu-nbd", "qemu-nbd", "qemu-nbd, raw file in tmpfs"),
        ServerSpec(
            "blkback-nopool",
            "blkback",
            "blkback, max_buffer_pages=0 (every request allocates)",
            params=(("max_buffer_pages", "0"),),
            price_only=True,
        ),
        ServerSpec(
            "blkback-squeeze",
            "blkback",
            "blkback, squeezed for the whole run (duration 2^32-1 ms + one pressure report)",
            params=(("buffer_squeeze_duration_ms", "4294967295"),),
            pressure=True,
            price_only=True,
        ),
    )
}

#: The two nbdkit configurations; the better of them per cell is "the one to beat".
NBDKIT_SERVERS: tuple[str, ...] = ("nbdkit", "nbdkit-t1")


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _blkback_env() -> dict[str, str]:
    """Environment for ``python -m blkback``: the same interpreter and the same source tree."""
    env = dict(os.environ)
    src = str(Path(blkback.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads) in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = raw[raw.rindex(b")") + 2 :].split()
    utime, stime = int(rest[11]), int(rest[12])
    return (utime + stime) / _CLK_TCK


def host_cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from ``/proc/stat``; busy excludes idle and iowait."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return total - fields[3] - fields[4], total


def ctl_argv(control: Path, *command: str) -> list[str]:
    """``python -m blkback ctl --control CTL COMMAND...`` with this interpreter."""
    return [sys.executable, "-m", "blkback", "ctl", "--control", str(control), *command]


@dataclass
class RunningServer:
    """A started server: its process, socket, URI and optional control socket."""

    spec: ServerSpec
    proc: subprocess.Popen[bytes]
    socket_path: Path
    uri: str
    log_path: Path
    control_path: Path | None = None
    image_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    _log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """PID of the server process (the one the bench started)."""
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """Server CPU time so far (utime + stime)."""
        return cpu_seconds(self.proc.pid)

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def log_tail(self, n_bytes: int = 2000) -> str:
        """The end of the server's stdout+stderr, for error messages."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-n_bytes:].decode(errors="replace")

    def ctl(self, *command: str, timeout_s: float = 20.0) -> str:
        """Run ``blkback ctl`` against this server and return its stdout."""
        if self.control_path is None:
            raise BenchError(f"{self.spec.name}: has no control socket")
        res = subprocess.run(
            ctl_argv(self.control_path, *command),
            capture_output=True,
            timeout=timeout_s,
            env=_blkback_env(),
            check=False,
        )
        if res.returncode != 0:
            raise BenchError(
                f"{self.spec.name}: blkback ctl {' '.join(command)} failed "
                f"(rc {res.returncode}): {res.stderr.decode(errors='replace').strip()}"
            )
        return res.stdout.decode()

    def stats(self) -> dict[str, Any]:
        """What ``ctl stats --json`` prints, fetched in-process from the control socket.

        Samples are taken inside fio's measured window, so they must be cheap: the bench uses
        ``blkback.server.control_client.request`` (one JSON line on the Unix socket) rather than
        starting a ``python -m blkback ctl`` process, which would cost ~0.1 s of CPU each time.
        """
        if self.control_path is None:
            raise BenchError(f"{self.spec.name}: has no control socket")
        from blkback.server.control_client import request

        try:
            return request(str(self.control_path), {"op": "stats"}, timeout_s=20.0)
        except (BlkbackError, OSError, ValueError) as exc:
            raise BenchError(f"{self.spec.name}: ctl stats failed: {exc}") from exc

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL. Returns the exit status."""
        rc: int | None = self.proc.poll()
        if rc is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.notes.append(f"did not stop within {grace_s:g} s of SIGTERM: killed")
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                rc = self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.image_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.image_path.unlink()
            self.image_path = None
        return rc


def _can_connect(path: Path) -> bool:
    if not path.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


def _wait_ready(server: RunningServer, paths: list[Path], timeout_s: float) -> None:
    clock = MonotonicClock()
    deadline = clock.now_ns() + round(timeout_s * NS_PER_S)
    pending = list(paths)
    while pending:
        if not server.alive():
            raise BenchError(
                f"{server.spec.name}: exited with status {server.proc.returncode} before "
                f"its socket accepted connections:\n{server.log_tail()}"
            )
        if _can_connect(pending[0]):
            pending.pop(0)
            continue
        if clock.now_ns() > deadline:
            server.stop()
            raise BenchError(
                f"{server.spec.name}: {pending[0]} did not accept a connection within "
                f"{timeout_s:g} s:\n{server.log_tail()}"
            )
        clock.wait_until(clock.now_ns() + 20 * NS_PER_MS)


def server_argv(
    spec: ServerSpec,
    sock: Path,
    *,
    export_size_bytes: int,
    control: Path | None = None,
    image: Path | None = None,
) -> list[str]:
    """The command line that starts ``spec`` on Unix socket ``sock``."""
    if spec.kind == "blkback":
        if control is None:
            raise ValueError("blkback needs a control socket path")
        argv = [sys.executable, "-m", "blkback", "serve", "--listen", f"unix:{sock}"]
        argv += ["--export", f"{BLKBACK_EXPORT}=memory:{export_size_bytes}"]
        for name, value in spec.params:
            argv += ["--param", f"{name}={value}"]
        # Host pressure signals must not squeeze the default server in the middle of a cell;
        # manual reports through the control socket (blkback-squeeze) still work.
        argv += ["--pressure", "off", *spec.serve_args]
        return [*argv, "--control", str(control)]
    if spec.kind == "nbdkit":
        argv = ["nbdkit", "-f", "-U", str(sock)]
        if spec.threads is not None:
            argv += ["--threads", str(spec.threads)]
        return [*argv, "memory", str(export_size_bytes)]
    if spec.kind == "qemu-nbd":
        if image is None:
            raise ValueError("qemu-nbd needs an image path")
        return ["qemu-nbd", "-f", "raw", "-t", "-k", str(sock), str(image)]
    raise ValueError(f"unknown server kind {spec.kind!r}")


def start_server(
    spec: ServerSpec,
    workdir: Path,
    *,
    export_size_bytes: int,
    tmpfs_dir: Path,
    ready_timeout_s: float = 30.0,
) -> RunningServer:
    """Start ``spec`` in ``workdir`` and return once its socket accepts connections.

    For qemu-nbd a fully allocated (``posix_fallocate``) image is created in ``tmpfs_dir``
    first and removed by :meth:`RunningServer.stop`. For ``spec.pressure`` one manual pressure
    report is sent and the squeeze deadline is checked to be set.
    """
    sock = workdir / f"{spec.name}.sock"
    control = workdir / f"{spec.name}.ctl" if spec.kind == "blkback" else None
    image: Path | None = None
    if spec.kind == "qemu-nbd":
        fd, name = tempfile.mkstemp(prefix="blkback-bench-", suffix=".img", dir=tmpfs_dir)
        image = Path(name)
        try:
            os.posix_fallocate(fd, 0, export_size_bytes)
        except OSError as exc:
            os.close(fd)
            image.unlink()
            raise BenchError(f"cannot allocate {export_size_bytes} bytes in {tmpfs_dir}") from exc
        os.close(fd)
    argv = server_argv(
        spec, sock, export_size_bytes=export_size_bytes, control=control, image=image
    )
    log_path = workdir / f"{spec.name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - closed by RunningServer.stop
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=_blkback_env() if spec.kind == "blkback" else None,
            preexec_fn=_set_pdeathsig,  # only prctl: async-signal safe enough
        )
    except OSError as exc:
        log.close()
        if image is not None:
            image.unlink()
        raise BenchError(f"{spec.name}: cannot start {argv[0]}: {exc}") from exc
    if spec.kind == "blkback":
        uri = f"nbd+unix:///{BLKBACK_EXPORT}?socket={sock}"
    else:
        uri = f"nbd+unix:///?socket={sock}"
    server = RunningServer(spec, proc, sock, uri, log_path, control, image, _log=log)
    try:
        _wait_ready(server, [sock] if control is None else [sock, control], ready_timeout_s)
        if spec.pressure:
            server.ctl("pressure")
            devices = server.stats().get("devices", [])
            if not devices or not all(d.get("squeezed", True) for d in devices):
                server.notes.append("pressure sent but squeeze_end_ms is not set on every device")
    except BaseException:
        server.stop()
        raise
    return server
