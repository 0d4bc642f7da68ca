"""What NBD's reference tester (nbd-tester-client) checks and blkback used to miss.

- After ``NBD_CMD_DISC`` on a TLS connection the server "MUST ... shut down the TLS session":
  a TLS client that refuses ragged EOFs sees the close_notify alert.
- Requests up to 64 MiB are served (as nbdkit does), while 32 MiB stays advertised.
- ``serve --single`` serves a socket handed over as stdin alone (inetd, ``nbd-tester-client
  -I``): see test_conventions.py for the clients that do it.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import struct
from pathlib import Path

import pytest
from rsupport import (
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    FLAG_FUA,
    OPT_STARTTLS,
    REP_ACK,
    connect,
    go,
    greet,
    make_certs,
    option,
    read_option_reply,
    recv_exact,
    request,
    simple_reply,
)
from support import need_tool, run, wait_until

MiB = 2**20
EINVAL = 22


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_tool("openssl")
    return make_certs(tmp_path_factory.mktemp("pki") / "certs")


def _tls_client(path: str, certs: Path) -> ssl.SSLSocket:
    """A raw NBD client that has done STARTTLS; ragged EOFs raise instead of reading as b""."""
    sock = greet(path)
    sock.sendall(option(OPT_STARTTLS))
    assert read_option_reply(sock)[1] == REP_ACK
    ctx = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
    ctx.check_hostname = False
    return ctx.wrap_socket(sock, suppress_ragged_eofs=False)


def test_tls_disconnect_sends_close_notify(serve, certs: Path) -> None:  # type: ignore[no-untyped-def]
    s = serve("disk=memory:1M", extra=("--tls", "require", "--tls-certificates", str(certs)))
    for _ in range(3):  # the reference tester tries 8 times; every try must see it
        tls = _tls_client(s.sock, certs)
        rep, size, _ = go(tls, b"disk")  # type: ignore[arg-type]
        assert (rep, size) == (REP_ACK, MiB)
        tls.sendall(request(CMD_READ, 0, 4096, cookie=7))
        err, cookie, data = simple_reply(tls, 4096)  # type: ignore[arg-type]
        assert (err, cookie, data) == (0, 7, bytes(4096))
        tls.sendall(request(CMD_DISC, 0, 0))
        # b"" only for a close_notify; a bare TCP close raises SSLEOFError here.
        assert tls.recv(1) == b""
        tls.close()


def test_tls_close_notify_does_not_wait_for_a_silent_client(serve, certs: Path) -> None:  # type: ignore[no-untyped-def]
    # A client that sends DISC and never reads again: the server sends its alert into the
    # socket buffer and closes; the connection is gone without the client's close_notify.
    s = serve("disk=memory:1M", extra=("--tls", "require", "--tls-certificates", str(certs)))
    tls = _tls_client(s.sock, certs)
    go(tls, b"disk")  # type: ignore[arg-type]
    tls.sendall(request(CMD_DISC, 0, 0))
    wait_until(lambda: s.stats()["server"]["connections"] == 0, 10, "the TLS connection closed")
    assert tls.recv(1) == b""
    tls.close()


def test_requests_up_to_64_mib_are_served_and_32_mib_advertised(serve) -> None:  # type: ignore[no-untyped-def]
    need_tool("nbdinfo")
    s = serve("disk=memory:128M")
    info = run(["nbdinfo", "--json", s.uri()]).stdout
    assert '"block_size_maximum": 33554432' in info
    sock, size = connect(s.sock, b"disk")
    assert size == 128 * MiB
    sock.settimeout(60)
    payload = os.urandom(MiB) * 64
    sock.sendall(request(CMD_WRITE, MiB, 64 * MiB, cookie=1) + payload)
    assert simple_reply(sock)[:2] == (0, 1)
    sock.sendall(request(CMD_READ, MiB, 64 * MiB, cookie=2))
    err, cookie, data = simple_reply(sock, 64 * MiB)
    assert (err, cookie) == (0, 2)
    assert data == payload
    # Beyond 64 MiB: EINVAL for a read, and the connection stays usable.
    sock.sendall(request(CMD_READ, 0, 64 * MiB + 4096, cookie=3))
    assert simple_reply(sock)[:2] == (EINVAL, 3)
    sock.sendall(request(CMD_READ, 0, 512, cookie=4))
    assert simple_reply(sock, 512)[:2] == (0, 4)
    sock.close()


def _send_and_read_reply(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return recv_exact(sock, 16)


def test_a_write_over_64_mib_with_its_payload_is_refused_and_skipped(serve) -> None:  # type: ignore[no-untyped-def]
    s = serve("disk=memory:128M")
    sock, _ = connect(s.sock, b"disk")
    sock.settimeout(60)
    # A payload longer than any request served cannot be skipped safely: the server hangs up
    # (nbdkit too, beyond its limit) instead of reading 4 GiB of junk.
    sock.sendall(request(CMD_WRITE, 0, 64 * MiB + 4096, cookie=5))
    with pytest.raises(OSError):  # ConnectionError (EOF, reset) or a broken pipe
        _send_and_read_reply(sock, bytes(64 * MiB + 4096))
    sock.close()
    with socket.socket(socket.AF_UNIX) as probe:  # and the server still takes clients
        probe.connect(s.sock)


def _random_chunks(rng: random.Random, total: int, largest: int) -> list[tuple[int, int]]:
    """``total`` bytes cut into 4 KiB-aligned (offset, length) pieces of up to ``largest``."""
    out = []
    offset = 0
    while offset < total:
        length = min(total - offset, rng.randrange(1, largest // 4096 + 1) * 4096)
        out.append((offset, length))
        offset += length
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("backend", ["memory", "file"])
def test_pipelined_huge_requests_keep_every_byte(serve, tmp_path: Path, backend: str) -> None:  # type: ignore[no-untyped-def]
    # The shape of nbd-tester-client's integrityhuge run: a fresh 50 MiB export with flush
    # and FUA, requests of up to ~48 MiB in flight at once, replies in any order (file
    # exports answer from worker threads), every byte checked.
    size = 52_428_800
    spec = f"memory:{size}" if backend == "memory" else f"file:{tmp_path}/huge.img:{size}"
    s = serve(f"disk={spec}")
    sock, export_size = connect(s.sock, b"disk")
    assert export_size == size
    sock.settimeout(120)
    rng = random.Random(20261127)
    model = bytearray(os.urandom(size))
    writes = _random_chunks(rng, size, 48 * MiB)
    assert max(length for _, length in writes) > 32 * MiB  # beyond the advertised maximum
    for cookie, (offset, length) in enumerate(writes, 1):
        flags = FLAG_FUA if cookie % 3 == 0 else 0
        sock.sendall(
            request(CMD_WRITE, offset, length, cookie, flags) + model[offset : offset + length]
        )
    done = {simple_reply(sock)[:2] for _ in writes}
    assert done == {(0, cookie) for cookie in range(1, len(writes) + 1)}
    sock.sendall(request(CMD_FLUSH, 0, 0, cookie=999))
    assert simple_reply(sock)[:2] == (0, 999)
    reads = _random_chunks(rng, size, 48 * MiB)
    for cookie, (offset, length) in enumerate(reads, 1000):
        sock.sendall(request(CMD_READ, offset, length, cookie))
    by_cookie = dict(enumerate(reads, 1000))
    for _ in reads:
        magic_err_cookie = recv_exact(sock, 16)
        err, cookie = struct.unpack(">IIQ", magic_err_cookie)[1:]
        assert err == 0
        offset, length = by_cookie.pop(cookie)
        assert recv_exact(sock, length) == model[offset : offset + length], (offset, length)
    assert not by_cookie
    sock.sendall(request(CMD_DISC, 0, 0))
    sock.close()
