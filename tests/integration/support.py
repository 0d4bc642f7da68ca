"""Helpers for integration tests: run blkback and real clients, wait, require tools."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blkback.clock import NS_PER_MS, NS_PER_S, MonotonicClock
from blkback.server.control_client import request

CLOCK = MonotonicClock()
POLL_NS = 20 * NS_PER_MS  # how often the helpers below look again

REPO = Path(__file__).resolve().parents[2]

# The handshake of the raw clients below (doc/proto.md)
NBDMAGIC = 0x4E42444D41474943
REQUEST = struct.Struct(">IHHQQI")
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY = struct.Struct(">IIQ")
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_READ = 0
CMD_WRITE = 1
IHAVEOPT = 0x49484156454F5054
OPT_EXPORT_NAME = 1
PAGE = 4096  # the pool's page: what one page of a request holds


def need_tool(*names: str) -> None:
    """Fail under CI (where scripts/setup installs them), skip elsewhere, naming the tool."""
    for name in names:
        if shutil.which(name) is None:
            msg = f"{name} is not installed (scripts/setup installs it)"
            if os.environ.get("CI"):
                pytest.fail(msg)
            pytest.skip(msg)


def need_root(what: str) -> None:
    """Fail under CI, skip elsewhere, when not root."""
    if os.geteuid() != 0:
        msg = f"{what} needs root"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def blkback_cmd(*args: str) -> list[str]:
    """The command line that runs this checkout's blkback with this interpreter."""
    return [sys.executable, "-m", "blkback", *args]


def child_env() -> dict[str, str]:
    """Environment for blkback child processes: this checkout's sources first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


@dataclass
class Served:
    """A running ``blkback serve`` process."""

    proc: subprocess.Popen[str]
    sock: str
    control: str
    exports: list[str]
    stdout_text: str = ""
    stderr_text: str = ""

    def uri(self, export: str | None = None) -> str:
        return f"nbd+unix:///{export or self.exports[0]}?socket={self.sock}"

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            blkback_cmd("ctl", "--control", self.control, *args),
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=60,
            check=check,
        )

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.ctl("stats", "--json").stdout)
        return out

    def rings(self, export: str | None = None) -> list[dict[str, Any]]:
        stats: dict[str, Any] = request(self.control, {"op": "stats"})
        return [
            r for d in stats["devices"] if export is None or d["name"] == export for r in d["rings"]
        ]

    def stop(self) -> int:
        """SIGTERM (graceful), then SIGKILL after 30 s; keeps the output for inspection."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        self.stdout_text = (self.stdout_text or "") + (out or "")
        self.stderr_text = (self.stderr_text or "") + (err or "")
        return self.proc.returncode


def wait_for_socket(path: str, proc: subprocess.Popen[str], timeout_s: float = 30) -> None:
    """Wait until a Unix socket accepts connections (or the process died)."""
    deadline = CLOCK.now_ns() + round(timeout_s * NS_PER_S)
    while CLOCK.now_ns() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"server exited with {proc.returncode}: {err}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            return
        CLOCK.wait_until(CLOCK.now_ns() + POLL_NS)
    raise AssertionError(f"{path} did not accept connections in {timeout_s} s")


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``pred`` until true; fail with ``what`` after ``timeout_s``."""
    deadline = CLOCK.now_ns() + round(timeout_s * NS_PER_S)
    while CLOCK.now_ns() < deadline:
        if pred():
            return
        CLOCK.wait_until(CLOCK.now_ns() + POLL_NS)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def rings_at_rest(control: str) -> bool:
    """Whether every ring of the server has rested (slept until its client's next request)."""
    stats = request(control, {"op": "stats"})
    return all(r["requests"]["rests"] >= 1 for d in stats["devices"] for r in d["rings"])


def sampling_parked(control: str) -> bool:
    """Whether every sampled pressure source of the server has stopped sampling while quiet
    (true with no pressure monitor)."""
    monitor = request(control, {"op": "stats"})["pressure"]["monitor"]
    sources = [] if monitor is None else monitor["sources"].values()
    return all(src["parked"] for src in sources if "parked" in src)


def thread_context_switches(pid: int) -> dict[str, int]:
    """Context switches so far of each thread of ``pid``: a thread that wakes adds one."""
    switches = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            lines = (task / "status").read_text().splitlines()
        except FileNotFoundError:  # the thread ended (a control request's)
            continue
        switches[task.name] = sum(
            int(line.split()[1])
            for line in lines
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
        )
    return switches


def assert_no_thread_wakes(pid: int, seconds: float) -> None:
    """No thread of ``pid`` runs for ``seconds``: an idle server must not wake.

    A thread that ends meanwhile (one that served a control request) is allowed."""
    before = thread_context_switches(pid)
    CLOCK.wait_until(CLOCK.now_ns() + round(seconds * NS_PER_S))
    after = thread_context_switches(pid)
    woke = {tid: after[tid] - n for tid, n in before.items() if after.get(tid, n) != n}
    assert not woke, f"threads woke while idle (thread id: switches): {woke}"
    assert len(after) >= len(before) - 1


def run(cmd: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a client tool; show its output if it fails."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if res.returncode != 0:
        raise AssertionError(
            f"{cmd[0]} exited {res.returncode}\nstdout: {res.stdout[-3000:]}\n"
            f"stderr: {res.stderr[-3000:]}"
        )
    return res


def start_handshake(sock: socket.socket) -> None:
    """Read the server's greeting and answer FIXED_NEWSTYLE | NO_ZEROES: the option phase."""
    magic, opt, _flags = struct.unpack(">QQH", recv_exact(sock, 18))
    assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
    sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES


def export_name(sock: socket.socket, name: bytes) -> tuple[int, int]:
    """Old-style ``NBD_OPT_EXPORT_NAME`` (what nbd-tester-client sends): (size, flags)."""
    sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, len(name)) + name)
    size, tflags = struct.unpack(">QH", recv_exact(sock, 10))
    return size, tflags


def raw_transmission(served: Served, export: bytes) -> socket.socket:
    """A raw client socket in the transmission phase of ``export`` (old-style
    ``NBD_OPT_EXPORT_NAME``), once the server has attached the connection's ring."""
    rings_before = len(served.rings())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(served.sock)
    start_handshake(sock)
    export_name(sock, export)
    # The ring is attached right after the handshake's last reply.
    wait_until(lambda: len(served.rings()) > rings_before, 5.0, "the connection's ring")
    return sock


def raw_write(sock: socket.socket, offset: int, payload: bytes, cookie: int = 1) -> None:
    """One NBD_CMD_WRITE on a transmission-phase socket; its simple reply must say OK."""
    sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, cookie, offset, len(payload)) + payload)
    reply = SIMPLE_REPLY.unpack(recv_exact(sock, SIMPLE_REPLY.size))
    assert reply == (SIMPLE_REPLY_MAGIC, 0, cookie), reply


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock`` (ConnectionError on an early EOF)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)
