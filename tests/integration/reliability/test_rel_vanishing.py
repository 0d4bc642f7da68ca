"""Clients that vanish at every point of a request: no page leaked, no ring left behind."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import pytest
from rsupport import (
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    connect,
    greet,
    request,
    rss_kib,
    rst_close,
)
from support import wait_until

MiB = 2**20


def _stream(rng: random.Random, size: int) -> tuple[bytes, list[int]]:
    """A pipelined request stream; returns it and the offsets where each part begins."""
    parts = bytearray()
    marks = []
    for i in range(rng.randint(1, 6)):
        kind = rng.random()
        length = rng.choice((512, 4096, 4096, 65536, 256 * 1024, 1 * MiB))
        off = rng.randrange(0, size - length + 1) & ~511
        marks.append(len(parts))
        if kind < 0.5:
            parts += request(CMD_WRITE, off, length, cookie=i)
            marks.append(len(parts))  # the payload begins
            parts += rng.randbytes(16) * (length // 16)
        elif kind < 0.9:
            parts += request(CMD_READ, off, length, cookie=i)
        else:
            parts += request(CMD_FLUSH, 0, 0, cookie=i)
    return bytes(parts), marks


def _victim(path: str, export: bytes, rng: random.Random, size: int, tally: dict[str, int]) -> None:
    where = rng.random()
    if where < 0.05:  # inside the handshake
        sock = greet(path)
        sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 40)[: rng.randint(1, 16)])
        tally["handshake"] += 1
    else:
        # A short timeout: a client that pipelines big writes without reading the replies
        # deadlocks with the server (both sides' buffers full) and then vanishes.
        sock, _ = connect(path, export)
        sock.settimeout(0.3)
        data, marks = _stream(rng, size)
        if where < 0.35:  # inside a request header
            m = rng.choice(marks)
            cut = min(len(data), m + rng.randint(1, 27))
            tally["header"] += 1
        elif where < 0.7:  # anywhere, payloads included
            cut = rng.randint(1, len(data))
            tally["payload"] += 1
        else:  # everything sent; vanish while the replies are coming (or not read at all)
            cut = len(data)
            tally["reply"] += 1
        try:
            sock.sendall(data[:cut])
            if where >= 0.7 and rng.random() < 0.5:
                sock.recv(rng.randint(1, 70000))  # a partial reply
        except OSError:
            pass
    if rng.random() < 0.5:
        rst_close(sock)
    else:
        sock.close()


@pytest.mark.slow
def test_1200_clients_vanishing_mid_request_leak_nothing(serve) -> None:
    # A memory export (inline I/O) and a file export (worker threads).
    s = serve("mem=memory:16M", "null=null:16M,delay=1ms")
    pid = s.proc.pid
    warm, _ = connect(s.sock, b"mem")
    warm.close()
    time.sleep(0.3)
    rss_before = rss_kib(pid)
    tally = {"handshake": 0, "header": 0, "payload": 0, "reply": 0}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(seed: int, n: int) -> None:
        rng = random.Random(seed)
        local = dict.fromkeys(tally, 0)
        try:
            for _ in range(n):
                export = rng.choice((b"mem", b"null"))
                _victim(s.sock, export, rng, 16 * MiB, local)
        except BaseException as exc:
            errors.append(exc)
        with lock:
            for k, v in local.items():
                tally[k] += v

    t0 = time.monotonic()
    worker(1, 400)  # sequential
    threads = [threading.Thread(target=worker, args=(100 + i, 200)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    assert not errors, errors[:3]
    kills = sum(tally.values())
    assert kills == 1200
    assert min(tally.values()) >= 40, tally

    def settled() -> bool:
        st = s.stats()
        return st["server"]["connections"] == 0 and all(not d["rings"] for d in st["devices"])

    wait_until(settled, 60, "every connection and ring to go away")
    st = s.stats()
    retired = st["server"]["retired_rings"]
    # Every connection that got past the handshake made a ring; all were retired, and every
    # page they ever allocated was freed.
    assert retired["rings"] >= kills - tally["handshake"] - 5, (retired, tally)
    assert retired["pages_allocated"] == retired["pages_freed"], retired
    # (+2: the fixture's readiness probe and the warm-up connection)
    assert st["server"]["connections_total"] == kills + 2
    rss_after = rss_kib(pid)
    # The server still serves, correctly.
    sock, _ = connect(s.sock, b"mem")
    sock.sendall(request(CMD_WRITE, 0, 4096, cookie=7) + b"\x5a" * 4096)
    sock.sendall(request(CMD_READ, 0, 4096, cookie=8))
    assert sock.recv(16)[4:8] == b"\0\0\0\0"
    got = b""
    while len(got) < 16 + 4096:
        got += sock.recv(65536)
    assert got[16:] == b"\x5a" * 4096
    sock.close()
    reclaimed = retired["pages_reclaimed"]
    print(
        f"\n{kills} kills {tally} in {took:.1f} s; rings retired {retired['rings']}, "
        f"pages allocated=freed={retired['pages_freed']}; in-flight pages of dead requests "
        f"returned at close: {reclaimed}; RSS {rss_before} -> {rss_after} KiB"
    )
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
    assert socket
