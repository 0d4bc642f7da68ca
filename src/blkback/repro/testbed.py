"""The test bed's pieces: environment checks, the server in dom0, the guests, the sampler.

Everything that changes the host is registered on a :class:`contextlib.ExitStack` by the
caller, so that it is undone on the way out whatever the way out is (an exception, Ctrl-C,
SIGTERM). Processes are ended by their own PID only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from blkback.clock import NS_PER_MS, NS_PER_S, Clock, MonotonicClock
from blkback.errors import EnvironmentProblem
from blkback.progress import StepProgress

GUEST_SCRIPT = Path(__file__).with_name("guest.py")
SYSTEM_PYTHON = "/usr/bin/python3"
MIB = 1 << 20
# The experiments run real processes, VMs and kernels in real time: every wait and every
# duration of repro/ is on this clock unless a caller hands in another one.
CLOCK: Final = MonotonicClock()


def poll_until(
    ready: Callable[[], bool], *, timeout_ns: int, interval_ns: int, clock: Clock = CLOCK
) -> bool:
    """Ask ``ready`` every ``interval_ns`` until it says yes (True) or ``timeout_ns`` has
    passed (False). ``ready`` is asked first at once, and last after the deadline has
    passed; it may raise to give up early (the process it waits for died)."""
    deadline = clock.now_ns() + timeout_ns
    while not ready():
        if clock.now_ns() > deadline:
            return False
        clock.wait_until(clock.now_ns() + interval_ns)
    return True


def missing_tools(tools: dict[str, str]) -> list[str]:
    """``tool (package)`` for each tool (name -> Debian package) not on the PATH."""
    return [f"{tool} ({pkg})" for tool, pkg in tools.items() if shutil.which(tool) is None]


def missing_facilities(*, need_overhead: bool) -> list[str]:
    """What this host lacks for ``blkback repro`` (empty when everything is there)."""
    from blkback.hostenv.cgroup import v1_memory_root
    from blkback.hostenv.swap import active_swaps

    out: list[str] = []
    if os.geteuid() != 0:
        out.append("root (cgroups, swapon, losetup, mount)")
    try:
        v1_memory_root()
    except EnvironmentProblem:
        out.append("a cgroup v1 memory controller")
    if not active_swaps() and (shutil.which("swapon") is None or shutil.which("mkswap") is None):
        out.append("swap (no active swap, and no swapon/mkswap to make a swapfile)")
    probe = (
        subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, check=False)
        if os.path.exists(SYSTEM_PYTHON)
        else None
    )
    if probe is None or probe.returncode != 0:
        out.append(f"libnbd's Python module for {SYSTEM_PYTHON} (python3-libnbd)")
    if need_overhead:
        out += missing_tools(
            {
                "nbdfuse": "nbdfuse",
                "losetup": "util-linux",
                "mkfs.ext4": "e2fsprogs",
                "fusermount3": "fuse3",
            }
        )
        if not os.path.exists("/dev/fuse"):
            out.append("/dev/fuse")
    return out


def file_tail(path: Path, chars: int) -> str:
    """The end of a child's log file, for an error message ("" if it cannot be read)."""
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def child_env() -> dict[str, str]:
    """Environment for our blkback children: this package's sources first on the path."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def kill_pid(proc: subprocess.Popen[Any], *, term_timeout: float = 10.0) -> None:
    """SIGTERM the process by its PID, SIGKILL after ``term_timeout``, and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=term_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM, SIGINT and SIGHUP (unless nohup) into KeyboardInterrupt: cleanup runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, handler)}
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # respect nohup
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, handler)
    # Ctrl-C too, even when started with SIGINT ignored (a background job of a script).
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class ServerProcess:
    """``blkback serve`` on a Unix socket, optionally joining a cgroup before it starts.

    With ``cgroup_procs`` the server is started through ``/bin/sh`` that writes its own PID
    into that ``cgroup.procs`` and then ``exec``s Python: the server's first allocation,
    and the pressure monitor's view of ``/proc/self/cgroup``, are inside the cgroup.
    """

    def __init__(
        self,
        workdir: Path,
        exports: list[str],
        *,
        params: dict[str, str | int] | None = None,
        cgroup_procs: str | None = None,
        workers: int = 4,
        pressure: str = "auto",
        tag: str = "srv",
        clock: Clock = CLOCK,
    ) -> None:
        self.clock = clock
        self.sock = str(workdir / f"{tag}.sock")
        self.control = str(workdir / f"{tag}.ctl")
        self.log_path = workdir / f"{tag}.log"
        argv = [
            sys.executable,
            "-m",
            "blkback",
            "serve",
            "--listen",
            f"unix:{self.sock}",
            "--control",
            self.control,
            "--workers",
            str(workers),
            "--pressure",
            pressure,
        ]
        for e in exports:
            argv += ["--export", e]
        for k, v in (params or {}).items():
            argv += ["--param", f"{k}={v}"]
        if cgroup_procs is not None:
            argv = ["/bin/sh", "-c", f'echo $$ > {cgroup_procs} && exec "$@"', "sh", *argv]
        self._log: IO[str] = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._log, text=True, env=child_env()
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout_ns: int = 60 * NS_PER_S) -> None:
        assert self.proc.stdout is not None
        deadline = self.clock.now_ns() + timeout_ns
        while self.clock.now_ns() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise EnvironmentProblem(
                    f"blkback serve exited ({self.proc.poll()}): {file_tail(self.log_path, 500)}"
                )
            if line.startswith("control:"):
                return
        raise EnvironmentProblem("blkback serve did not become ready in time")

    def request(self, payload: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
        from blkback.server.control_client import request

        return request(self.control, payload, timeout_s)

    def stats(self) -> dict[str, Any]:
        return self.request({"op": "stats"})

    def set(self, name: str, value: str | int) -> None:
        self.request({"op": "set", "name": name, "value": str(value)})

    def stop(self) -> None:
        kill_pid(self.proc, term_timeout=30.0)
        with contextlib.suppress(OSError):
            self._log.close()

    def log_tail(self, n: int = 2000) -> str:
        return file_tail(self.log_path, n)


class GuestProcess:
    """The guests' load generator (``guest.py`` under Debian's Python with libnbd)."""

    def __init__(self, server: ServerProcess, names: list[str], **opts: Any) -> None:
        argv = [
            SYSTEM_PYTHON,
            str(GUEST_SCRIPT),
            "--socket",
            server.sock,
            "--exports",
            ",".join(names),
            "--watch-stdin",
        ]
        for k, v in opts.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.stop()
            raise EnvironmentProblem(f"guest load generator failed to connect: {err[-500:]}")

    def wait_ready(self) -> None:
        """Nothing to wait for: connected once constructed."""

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Tell it to stop and return its totals."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        result: dict[str, Any] = {}
        try:
            out, _ = self.proc.communicate(timeout=timeout_s)
            for line in out.splitlines():
                if line.startswith("{"):
                    result = json.loads(line)
        except subprocess.TimeoutExpired:
            pass
        self.stop()
        return result

    def stop(self) -> None:
        kill_pid(self.proc)


@dataclass
class Sampler:
    """Polls the server's stats, the cgroup's memory and the host's swap counters."""

    server: ServerProcess
    cgroup_path: str | None
    interval_ns: int = 200 * NS_PER_MS
    clock: Clock = CLOCK
    samples: list[dict[str, Any]] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    t0_ns: int = 0

    def start(self) -> None:
        self.t0_ns = self.clock.now_ns()
        self._thread = threading.Thread(target=self._run, name="repro-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _cg(self, name: str) -> int:
        assert self.cgroup_path is not None
        with open(os.path.join(self.cgroup_path, name)) as f:
            return int(f.read())

    def sample(self) -> dict[str, Any]:
        from blkback.hostenv.procfs import swap_counters

        t_ns = self.clock.now_ns() - self.t0_ns
        s = self.server.stats()
        pools = [r["pool_pages"] for d in s["devices"] for r in d["rings"]]
        inflight = sum(r["in_flight_pages"] for d in s["devices"] for r in d["rings"])
        sw = swap_counters()
        out: dict[str, Any] = {
            "t": round(t_ns / NS_PER_S, 3),
            "pool_pages": sum(pools),
            "rings_nonempty": sum(1 for p in pools if p),
            "in_flight_pages": inflight,
            "rss_bytes": s["server"]["rss_bytes"],
            "squeezes": sum(d["squeezes"] for d in s["devices"]),
            "pressure_reports": s["pressure"]["reports"],
            "pressure_events": sum(s["pressure"].get("events", {}).values()),
            "pswpin": sw.pswpin,
            "pswpout": sw.pswpout,
        }
        if self.cgroup_path is not None:
            with contextlib.suppress(OSError):
                usage = self._cg("memory.usage_in_bytes")
                memsw = self._cg("memory.memsw.usage_in_bytes")
                out["cg_usage"] = usage
                out["cg_swap"] = max(0, memsw - usage)
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.sample())
            except Exception:  # the server may be busy or going away; count and go on
                self.errors += 1
            # The interval runs from the end of a sample, so a slow server is not polled harder.
            self.clock.wait_until(self.clock.now_ns() + self.interval_ns, self._stop)


def median(xs: list[float]) -> float:
    """The median (mean of the middle two for even lengths); nan for none."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    n = len(s)
    return float(s[n // 2]) if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def spread(xs: list[float]) -> dict[str, float]:
    """min, median, max and relative spread ((max-min)/median) of repeated measurements."""
    if not xs:
        return {"min": float("nan"), "median": float("nan"), "max": float("nan"), "rel": 0.0}
    m = median(xs)
    return {
        "min": float(min(xs)),
        "median": m,
        "max": float(max(xs)),
        "rel": (max(xs) - min(xs)) / m if m else 0.0,
    }


# The repro runner's progress bar (rich, on stderr, only on a terminal).
Progress = StepProgress
