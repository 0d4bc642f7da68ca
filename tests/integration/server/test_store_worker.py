"""A large write is stored by the ring's store worker while the ring receives the next one.

``xen-blkback`` submits a request's bio and goes on with its ring; the request's pages stay
in flight until the I/O completes and are then given back to the pool, which the next pass
trims. blkback's ring does the same with writes of ``ASYNC_WRITE`` bytes or more on a plain
socket: it receives the payload into the request's pages, hands the store and the reply to
a worker (whose copy runs with the GIL released), and receives the next request. Seen from
outside, through the pool's counters and the data (no timing): pipelined 1 MiB writes have
two requests' pages in flight at once, never more than the worker's bound allows, every
reply comes back, the data reads back, and the pages all return to the pool, which the
passes then trim to its target.
"""

from __future__ import annotations

import random
from collections.abc import Callable

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

MIB = 1 << 20
PAGES_PER_WRITE = MIB // PAGE
STORES_IN_FLIGHT = 2  # server/connection.py: requests the store worker holds at most


# Both backends served inline with direct access: the memory region (its copy releases the
# GIL) and the memfd (a descriptor's pwritev, which does).
@pytest.mark.parametrize("backend", ["memory", "memfd"])
def test_pipelined_large_writes_overlap_their_stores_and_every_page_comes_back(
    serve: Callable[..., Served], backend: str
) -> None:
    spec = f"disk={backend}:16M"
    # max_buffer_pages=0: the pages a worker gives back after the batch's pass are trimmed
    # by the ring's next timed pass, as the kernel's are after their completion.
    served = serve(spec, params=("max_buffer_pages=0",))
    sock = raw_transmission(served, b"disk")
    try:
        n = 8
        rng = random.Random(31)
        payloads = [rng.randbytes(MIB) for _ in range(n)]
        sock.sendall(
            b"".join(
                REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, i, i * MIB, MIB) + payloads[i]
                for i in range(n)
            )
        )
        replies = [SIMPLE_REPLY.unpack(recv_exact(sock, SIMPLE_REPLY.size)) for _ in range(n)]
        # NBD lets replies come in any order; every one must come, and say OK.
        assert sorted(replies) == [(SIMPLE_REPLY_MAGIC, 0, i) for i in range(n)]

        wait_until(
            lambda: (
                served.rings()[0]["in_flight_pages"] == 0 and served.rings()[0]["pool_pages"] == 0
            ),
            5.0,
            "the pages back from the worker, and trimmed",
        )
        (ring,) = served.rings()
        assert ring["requests"]["wr"] == n
        # While the worker stored one write, the ring had taken the next one's pages: two
        # requests in flight at least, and no more than the worker's bound plus the one
        # the ring is receiving.
        peak = ring["peak_in_flight_pages"]
        assert 2 * PAGES_PER_WRITE <= peak <= (STORES_IN_FLIGHT + 1) * PAGES_PER_WRITE, peak
        assert ring["pages_freed"] == ring["pages_allocated"]

        sock.sendall(
            b"".join(REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, i, i * MIB, MIB) for i in range(n))
        )
        for i in range(n):
            assert SIMPLE_REPLY.unpack(recv_exact(sock, SIMPLE_REPLY.size)) == (
                SIMPLE_REPLY_MAGIC,
                0,
                i,
            )
            assert recv_exact(sock, MIB) == payloads[i], f"write {i} read back"
    finally:
        sock.close()
