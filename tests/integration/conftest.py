"""Fixtures for tests that run the real server and drive it with real NBD clients."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import Served, blkback_cmd, child_env, wait_for_socket


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Start ``blkback serve`` processes on Unix sockets; all are stopped at the end."""
    started: list[Served] = []

    def start(*exports: str, params: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> Served:
        n = len(started)
        sock = str(tmp_path / f"nbd{n}.sock")
        control = str(tmp_path / f"ctl{n}.sock")
        exports = exports or ("disk=memory:64M",)
        cmd = blkback_cmd("serve", "--listen", f"unix:{sock}", "--control", control)
        for e in exports:
            cmd += ["--export", e]
        for p in params:
            cmd += ["--param", p]
        cmd += list(extra)
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
