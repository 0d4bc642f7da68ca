"""Fixtures for tests that run the real server and drive it with real NBD clients."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import Served, blkback_cmd, child_env, wait_for_socket

from blkback.errors import EnvironmentProblem
from blkback.hostenv.cgroup import MemoryCgroup, v1_memory_root
from blkback.hostenv.swap import TemporarySwap

PRESSURE_LIMIT = 96 << 20  # the memory limit of the pressure tests' cgroup


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; every one still running is killed at the end."""
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=30)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Start ``blkback serve`` processes on Unix sockets; all are stopped at the end."""
    started: list[Served] = []

    def start(
        *exports: str,
        params: tuple[str, ...] = (),
        extra: tuple[str, ...] = (),
        pressure: str = "off",
    ) -> Served:
        """Serve ``exports``; the kernel pressure monitor is off unless asked for, so that
        pressure elsewhere on the host cannot squeeze pools under a test's feet."""
        n = len(started)
        sock = str(tmp_path / f"nbd{n}.sock")
        control = str(tmp_path / f"ctl{n}.sock")
        exports = exports or ("disk=memory:64M",)
        cmd = blkback_cmd("serve", "--listen", f"unix:{sock}", "--control", control)
        for e in exports:
            cmd += ["--export", e]
        for p in params:
            cmd += ["--param", p]
        cmd += ["--pressure", pressure, *extra]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
        )
        served = Served(proc, sock, control, [e.split("=", 1)[0] for e in exports])
        started.append(served)
        wait_for_socket(sock, proc)
        wait_for_socket(control, proc)
        return served

    try:
        yield start
    finally:
        for s in started:
            s.stop()


def missing(reason: str) -> None:
    """Skip, or fail under CI=true, naming the missing facility."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"real-pressure test cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture
def pressure_cgroup() -> Iterator[MemoryCgroup]:
    """A memory-limited cgroup v1 child with swap available; all removed afterwards."""
    if os.geteuid() != 0:
        missing("needs root (cgroup v1 memory child, swapon)")
    try:
        v1_memory_root()
    except EnvironmentProblem as exc:
        missing(str(exc))
    try:
        swap = TemporarySwap(512)
        swap.__enter__()
    except EnvironmentProblem as exc:
        missing(f"no swap and cannot make a swapfile: {exc}")
    try:
        cgroup = MemoryCgroup(
            f"blkback-test-{os.getpid()}-{time.monotonic_ns()}",
            limit_bytes=PRESSURE_LIMIT,
            swappiness=60,
        )
        try:
            cgroup.create()
        except EnvironmentProblem as exc:
            missing(str(exc))
        try:
            yield cgroup
        finally:
            cgroup.remove()
    finally:
        swap.__exit__(None, None, None)
