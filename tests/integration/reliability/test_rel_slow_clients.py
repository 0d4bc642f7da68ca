"""Slow clients: a payload that keeps moving is never cut; one that stops is, after --io-timeout."""

from __future__ import annotations

import subprocess
import time

from rsupport import CMD_READ, CMD_WRITE, connect, request, simple_reply
from support import blkback_cmd, child_env

MiB = 2**20


def test_a_slow_payload_that_keeps_coming_outlives_the_io_timeout(serve) -> None:
    # 256 KiB in 16 KiB pieces 0.15 s apart: 2.4 s in all, twice --io-timeout, but never a
    # gap longer than 0.15 s. (The old limit added up every receive timeout of the payload.)
    srv = serve("disk=memory:8M", extra=("--io-timeout", "1.2"))
    sock, _ = connect(srv.sock, b"disk")
    try:
        sock.settimeout(10)
        length = 256 * 1024
        data = bytes(range(256)) * (length // 256)
        sock.sendall(request(CMD_WRITE, MiB, length, cookie=7))
        t0 = time.monotonic()
        for i in range(0, length, 16 * 1024):
            sock.sendall(data[i : i + 16 * 1024])
            time.sleep(0.15)
        assert time.monotonic() - t0 > 2.0
        assert simple_reply(sock) == (0, 7, b"")
        sock.sendall(request(CMD_READ, MiB, length, cookie=8))
        assert simple_reply(sock, length) == (0, 8, data)
    finally:
        sock.close()


def test_a_payload_that_stops_is_dropped_after_the_io_timeout(serve) -> None:
    srv = serve("disk=memory:8M", extra=("--io-timeout", "1"))
    sock, _ = connect(srv.sock, b"disk")
    try:
        sock.settimeout(15)
        sock.sendall(request(CMD_WRITE, 0, MiB, cookie=1))
        sock.sendall(b"\x01" * 4096)  # then nothing
        t0 = time.monotonic()
        try:
            got = sock.recv(16)
        except (TimeoutError, ConnectionResetError) as exc:
            got = repr(exc).encode()
        waited = time.monotonic() - t0
        assert got == b"", got  # the server closed the connection, without a reply
        assert 0.9 < waited < 5.0, waited
    finally:
        sock.close()
    # The server still serves others, and the abandoned request's pages went back.
    sock, _ = connect(srv.sock, b"disk")
    try:
        sock.settimeout(10)
        sock.sendall(request(CMD_READ, 0, 4096, cookie=2))
        assert simple_reply(sock, 4096) == (0, 2, bytes(4096))  # the partial write never landed
    finally:
        sock.close()


def test_io_timeout_is_checked() -> None:
    proc = subprocess.run(
        blkback_cmd("serve", "--listen", "unix:/nonexistent/x", "--io-timeout", "0"),
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0
    assert "--io-timeout must be between" in proc.stderr
