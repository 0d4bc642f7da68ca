"""Limits with clear errors: strings, options, requests, connections, timeouts, export names."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from rsupport import (
    CMD_READ,
    CMD_WRITE,
    OPT_GO,
    OPT_INFO,
    REP_ACK,
    connect,
    go,
    go_data,
    greet,
    option,
    read_option_reply,
    recv_exact,
    request,
    simple_reply,
)
from support import OPT_EXPORT_NAME, wait_until

ERR_UNSUP = 2**31 + 1
ERR_INVALID = 2**31 + 3
ERR_UNKNOWN = 2**31 + 6
ERR_TOO_BIG = 2**31 + 9
EINVAL = 22
MiB = 2**20


def closed_by_server(sock: socket.socket, within_s: float) -> float:
    """Seconds until the server closed ``sock`` (fails if it did not within ``within_s``)."""
    t0 = time.monotonic()
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        pytest.fail(f"server did not close the connection within {within_s} s")
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def test_export_names_never_reach_outside_the_exports(serve) -> None:
    s = serve("disk=memory:1M", "second=memory:2M")
    sock = greet(s.sock)
    for name in (b"../etc/passwd", b"/etc/passwd", b"disk/../second", b"DISK", b"x" * 4096):
        for opt in (OPT_INFO, OPT_GO):
            rep, _, _ = go(sock, name) if opt == OPT_GO else _info(sock, name)
            assert rep == ERR_UNKNOWN, (name[:20], rep)
    # Longer than the spec's 4096: refused as malformed, and haggling goes on.
    sock.sendall(option(OPT_INFO, go_data(b"y" * 4097)))
    assert read_option_reply(sock)[1] == ERR_INVALID
    rep, size, _ = go(sock, b"")  # "" is the default export: the first one
    assert (rep, size) == (REP_ACK, MiB)
    sock.close()
    # OPT_EXPORT_NAME cannot be errored: an unknown or over-long name is a disconnect.
    for name in (b"../etc/passwd", b"z" * 5000):
        sock = greet(s.sock)
        sock.sendall(option(OPT_EXPORT_NAME, name))
        closed_by_server(sock, 5)
        sock.close()
    sock, size = connect(s.sock, b"second")
    assert size == 2 * MiB
    sock.close()


def _info(sock: socket.socket, name: bytes) -> tuple[int, int, int]:
    sock.sendall(option(OPT_INFO, go_data(name)))
    while True:
        _, rep, _ = read_option_reply(sock)
        if rep != 3:
            return rep, 0, 0


def test_option_length_and_count_limits(serve) -> None:
    s = serve("disk=memory:1M")
    sock = greet(s.sock)
    # An option larger than the server buffers (64 KiB) is skipped and answered TOO_BIG.
    sock.sendall(option(OPT_GO, b"\0" * (200 * 1024)))
    assert read_option_reply(sock)[1] == ERR_TOO_BIG
    rep, _, _ = go(sock, b"disk")
    assert rep == REP_ACK
    sock.close()
    # 1000 options are answered; the 1001st closes the connection.
    sock = greet(s.sock)
    sock.sendall(option(99) * 1001)
    for _ in range(999):
        assert read_option_reply(sock)[1] == ERR_UNSUP
    closed_by_server(sock, 5)
    sock.close()


def test_request_length_limits(serve) -> None:
    # --max-block is what is advertised; --max-request is what is served (nbdkit serves
    # past the advertised maximum, up to 64 MiB by default: see the next test).
    s = serve("disk=memory:8M", extra=("--max-block", "1M", "--max-request", "1M"))
    sock, _ = connect(s.sock, b"disk")
    sock.sendall(request(CMD_READ, 0, 2 * MiB, cookie=1))
    assert simple_reply(sock)[:2] == (EINVAL, 1)
    # A too-long WRITE is refused but its payload is read and dropped: still in sync.
    sock.sendall(request(CMD_WRITE, 0, 2 * MiB, cookie=2) + b"\xab" * (2 * MiB))
    assert simple_reply(sock)[:2] == (EINVAL, 2)
    sock.sendall(request(CMD_READ, 0, 4096, cookie=3))
    err, cookie, data = simple_reply(sock, 4096)
    assert (err, cookie, data) == (0, 3, bytes(4096))
    # A WRITE above 32 MiB would make the server read a huge payload: a disconnect.
    sock.sendall(request(CMD_WRITE, 0, 33 * MiB, cookie=4))
    closed_by_server(sock, 5)
    sock.close()


def test_requests_past_the_advertised_maximum_are_served(serve) -> None:
    s = serve("disk=memory:8M", extra=("--max-block", "1M"))
    sock, _ = connect(s.sock, b"disk")
    sock.sendall(request(CMD_READ, 0, 2 * MiB, cookie=1))
    err, cookie, data = simple_reply(sock, 2 * MiB)
    assert (err, cookie, data) == (0, 1, bytes(2 * MiB))
    sock.close()


def test_max_connections_refuses_the_extra_one(serve) -> None:
    s = serve("disk=memory:1M", extra=("--max-connections", "2"))
    held = [connect(s.sock)[0] for _ in range(2)]
    extra = socket.socket(socket.AF_UNIX)
    extra.connect(s.sock)
    closed_by_server(extra, 5)  # closed before any greeting
    extra.close()
    assert s.stats()["server"]["connections_refused"] == 1
    held.pop().close()
    # The server saw the close (its count fell) before the slot is tried again.
    wait_until(lambda: s.stats()["server"]["connections"] == 1, 5, "the closed connection")
    sock, _ = connect(s.sock)  # a slot is free again
    sock.close()
    held[0].close()


def test_handshake_timeout_drops_silent_and_dripping_clients(serve) -> None:
    s = serve("disk=memory:1M", extra=("--handshake-timeout", "1"))
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(s.sock)
    recv_exact(silent, 18)
    took = closed_by_server(silent, 5)
    assert 0.5 < took < 3, took
    silent.close()
    # A client that sends one byte at a time, never finishing, is dropped by the same deadline.
    drip = greet(s.sock)
    data = option(OPT_GO, go_data(b"disk"))
    t0 = time.monotonic()
    with pytest.raises(OSError):  # noqa: PT012
        for b in data:
            drip.sendall(bytes([b]))
            time.sleep(0.2)
        pytest.fail("the dripping client finished its handshake")
    assert time.monotonic() - t0 < 3
    drip.close()
    sock, _ = connect(s.sock)  # others are still served
    sock.close()


def test_idle_timeout_drops_an_idle_connection_only(serve) -> None:
    s = serve("disk=memory:1M", extra=("--idle-timeout", "1"))
    idle, _ = connect(s.sock)
    busy, _ = connect(s.sock)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.5:
        busy.sendall(request(CMD_READ, 0, 512, cookie=9))
        assert simple_reply(busy, 512)[0] == 0
        time.sleep(0.2)
    idle.settimeout(0.1)
    assert idle.recv(16) == b""  # already closed
    idle.close()
    busy.close()
    assert struct  # (keeps the import list stable for later tests)
