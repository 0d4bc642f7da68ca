"""Busy polling on a real server with the default settings: QD1 requests are served byte for
byte, and a ring that has gone idle never spins (its poll counters stay still)."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest
from support import need_tool, wait_until

from blkback.server.control_client import request

USR = "/usr/bin"
ROUNDS = 2000

# argv: URI, rounds. Writes then reads back one 4 KiB block at a time (queue depth 1), prints
# {"requests": n, "mismatches": [...]}, then holds the connection open until stdin closes.
SCRIPT = r"""
import json, sys
import nbd

uri, rounds = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
blocks = h.get_size() // 4096
bad = []
for i in range(rounds):
    off = (i * 7919 % blocks) * 4096
    data = (i.to_bytes(4, "little") * 1024)
    h.pwrite(data, off)
    if h.pread(4096, off) != data:
        bad.append(off)
print(json.dumps({"requests": 2 * rounds, "mismatches": bad[:10]}), flush=True)
sys.stdin.read()
h.shutdown()
"""


def _ring(control: str) -> tuple[dict[str, int], float]:
    """The only ring's request counters, and the server clock's ``now_ms``."""
    stats = request(control, {"op": "stats"})
    [ring] = [r for d in stats["devices"] for r in d["rings"]]
    counters: dict[str, int] = ring["requests"]
    now_ms: float = stats["now_ms"]
    return counters, now_ms


@pytest.mark.parametrize(
    "extra",
    [(), ("--poll-us", "1000000")],
    ids=["default", "window-up-to-1s"],
)
def test_qd1_is_served_exactly_and_an_idle_ring_never_spins(serve, extra: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    need_tool(f"{USR}/python3")
    s = serve("disk=memory:16M", extra=extra)  # default settings: adaptive busy polling
    with subprocess.Popen(
        [f"{USR}/python3", "-c", SCRIPT, s.uri(), str(ROUNDS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PATH": f"{USR}:{os.environ.get('PATH', '')}"},
    ) as client:
        try:
            assert client.stdout is not None and client.stdin is not None
            out: dict[str, Any] = json.loads(client.stdout.readline() or "{}")
            assert out == {"requests": 2 * ROUNDS, "mismatches": []}
            counters, _ = _ring(s.control)
            assert (counters["rd"], counters["wr"]) == (ROUNDS, ROUNDS)
            assert 0 <= counters["poll_hits"] <= counters["polls"] <= 2 * ROUNDS
            if extra:
                # Every gap of this client is far below 1 s: the trial epoch of spinning (the
                # third of 1024 batches) grows a window that catches requests.
                assert counters["poll_hits"] > 0, counters
            # Idle now: after at most one last window the ring times out and rests.
            wait_until(lambda: _ring(s.control)[0]["rests"] >= 1, 5.0, "the ring to rest")
            before, t0_ms = _ring(s.control)
            wait_until(lambda: _ring(s.control)[1] >= t0_ms + 500, 5.0, "500 ms of idleness")
            after, _ = _ring(s.control)
            idle_keys = ("polls", "poll_hits", "polled_ns", "rests", "passes")
            assert {k: after[k] for k in idle_keys} == {k: before[k] for k in idle_keys}
            client.stdin.close()
            assert client.wait(30) == 0
        finally:
            if client.poll() is None:
                client.kill()
