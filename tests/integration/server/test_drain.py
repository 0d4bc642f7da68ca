"""A ring serves every request waiting in its socket before its pass, as the kernel's
``do_block_io_op`` drains its ring before ``xen_blkif_schedule`` shrinks the pool; within
that batch, writes are served in groups of a few pages, so that their replies go out early.

Large writes are received straight into their pages, which leaves the staging buffer empty
after each one; the ring then looks for the next request in the socket before it runs the
pass. Seen from outside through the pool's counters (no timing): a pipelined stream of large
writes with ``max_buffer_pages=0`` runs fewer passes than requests, yet every pass leaves the
pool at its target (0) and the data read back is the data written.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from support import (
    CMD_READ,
    CMD_WRITE,
    PAGE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    Served,
    raw_transmission,
    recv_exact,
    wait_until,
)

PAYLOAD = 64 * 1024  # the smallest write received straight into its pages
TAIL = PAGE


@dataclass
class Ring:
    """A server with an empty pool target, one raw client, and its ring's stats at start."""

    served: Served
    sock: socket.socket
    before: dict[str, Any]

    def now(self) -> dict[str, Any]:
        (ring,) = self.served.rings()
        return ring


@pytest.fixture
def ring(serve: Callable[..., Served]) -> Iterator[Ring]:
    # max_buffer_pages=0: every pass empties the pool, so passes show in its counters. A
    # timed pass could end a drain (it is due after lru_interval_ms): not in these tests.
    served = serve("disk=memory:16M", params=("max_buffer_pages=0", "lru_interval_ms=60000"))
    sock = raw_transmission(served, b"disk")
    (before,) = served.rings()
    try:
        yield Ring(served, sock, before)
    finally:
        sock.close()


def _io_passes(ring: dict[str, Any]) -> int:
    """Passes that followed a batch (the rest were timed, idle or woken by a squeeze)."""
    return int(ring["requests"]["passes"]) - int(ring["requests"]["idle_passes"])


def _replies(sock: socket.socket, n: int, data_len: int = 0) -> list[bytes]:
    out = []
    for i in range(n):
        magic, err, cookie = SIMPLE_REPLY.unpack(recv_exact(sock, SIMPLE_REPLY.size))
        assert (magic, err, cookie) == (SIMPLE_REPLY_MAGIC, 0, i)
        out.append(recv_exact(sock, data_len) if data_len else b"")
    return out


def test_a_stream_of_large_writes_runs_one_pass_per_drain_and_keeps_the_pool_at_target(
    ring: Ring,
) -> None:
    sock, before = ring.sock, ring.before
    n = 16
    rng = random.Random(12)
    payloads = [rng.randbytes(PAYLOAD) for _ in range(n)]
    headers = [REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, i, i * PAYLOAD, PAYLOAD) for i in range(n)]
    # Each send starts with the end of one payload and the next request's header: one
    # socket buffer, so the header is waiting when the ring has the payload. The ring's
    # only reason to stop serving is then a socket with nothing in it.
    sends = [headers[0] + payloads[0][:-TAIL]]
    sends += [payloads[i][-TAIL:] + headers[i + 1] + payloads[i + 1][:-TAIL] for i in range(n - 1)]
    sends.append(payloads[-1][-TAIL:])
    for chunk in sends:
        sock.sendall(chunk)
    _replies(sock, n)
    # The replies go out before the pages go back and the pass runs.
    wait_until(
        lambda: _io_passes(ring.now()) > _io_passes(before), 5.0, "the pass after the writes"
    )
    after = ring.now()

    def grew(key: str) -> int:
        return int(after[key]) - int(before[key])

    passes = _io_passes(after) - _io_passes(before)
    per_request = PAYLOAD // PAGE
    assert after["requests"]["wr"] - before["requests"]["wr"] == n
    # One drain: every request after the first reused the first one's pages from the pool.
    assert passes == 1
    assert grew("misses") == per_request * passes
    assert grew("hits") == per_request * (n - passes)
    # The pool held one request's pages at most, and every pass left it at its target: 0.
    assert after["peak_pool_pages"] == per_request
    assert after["pool_pages"] == 0
    assert grew("pages_freed") == grew("pages_allocated") == per_request

    reads = [REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, i, i * PAYLOAD, PAYLOAD) for i in range(n)]
    sock.sendall(b"".join(reads))
    assert _replies(sock, n, PAYLOAD) == payloads


def test_without_a_waiting_request_every_large_write_has_its_own_pass(ring: Ring) -> None:
    sock, before = ring.sock, ring.before
    n = 4
    for i in range(n):
        sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, 0, i * PAYLOAD, PAYLOAD))
        sock.sendall(bytes([i + 1]) * PAYLOAD)
        _replies(sock, 1)
        # The next write is sent only once this one's pass ran: the drain found nothing.
        wait_until(
            lambda i=i: _io_passes(ring.now()) == _io_passes(before) + i + 1,
            5.0,
            f"the pass after write {i}",
        )
    after = ring.now()
    assert int(after["misses"]) - int(before["misses"]) == n * PAYLOAD // PAGE
    assert after["pool_pages"] == 0


WRITE_GROUP_PAGES = 4  # server/connection.py: a group ends after this many pages of writes


@pytest.mark.parametrize(("cmd", "in_flight"), [(CMD_WRITE, WRITE_GROUP_PAGES), (CMD_READ, 16)])
def test_a_burst_of_small_writes_is_served_in_groups_of_a_few_pages_and_reads_in_one(
    serve: Callable[..., Served], cmd: int, in_flight: int
) -> None:
    # 16 pipelined 4 KiB requests sent at once. A group takes its pages from the pool in one
    # call and gives them back after its replies, so the pages in flight at once are the
    # largest group's: writes are cut after WRITE_GROUP_PAGES pages (their replies must not
    # wait for the whole burst's copies), reads are not (16 headers are one group).
    served = serve("disk=memory:16M")
    sock = raw_transmission(served, b"disk")
    try:
        n = 16
        rng = random.Random(7)
        payloads = [rng.randbytes(PAGE) for _ in range(n)]
        burst = b"".join(
            REQUEST.pack(REQUEST_MAGIC, 0, cmd, i, i * PAGE, PAGE)
            + (payloads[i] if cmd == CMD_WRITE else b"")
            for i in range(n)
        )
        sock.sendall(burst)
        replies = _replies(sock, n, PAGE if cmd == CMD_READ else 0)
        # A group counts its requests once its replies are out: wait for the last ones.
        counter = "wr" if cmd == CMD_WRITE else "rd"
        wait_until(lambda: served.rings()[0]["requests"][counter] == n, 5.0, "the counts")
        (after,) = served.rings()
        assert after["peak_in_flight_pages"] == in_flight
        if cmd == CMD_READ:
            assert replies == [bytes(PAGE)] * n  # nothing was written: zeroes
    finally:
        sock.close()
