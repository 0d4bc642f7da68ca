"""Mutated handshakes and requests against a running server; then it must be healthy."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from rsupport import CMD_READ, CMD_WRITE, connect, request, simple_reply
from support import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: the fuzz package
from fuzz.socket_fuzz import run


@pytest.mark.slow
def test_server_survives_mutated_streams_and_serves_a_clean_client(serve, tmp_path: Path) -> None:
    # The export names the seeds use: disk (memory), other (read-only), aligned (a file, so
    # the worker-thread path is fuzzed too).
    s = serve(
        "disk=memory:1M",
        "other=memory:1M,readonly",
        f"aligned=file:{tmp_path}/aligned.img:16M",
        extra=("--handshake-timeout", "2"),
    )
    t0 = time.monotonic()
    tally = run(s.sock, 10_000, seed=7, threads=3)
    took = time.monotonic() - t0
    assert not tally.errors, tally.errors[:5]
    assert tally.inputs == 10_000
    assert s.proc.poll() is None  # still running

    def settled() -> bool:
        st = s.stats()
        return st["server"]["connections"] == 0 and all(not d["rings"] for d in st["devices"])

    wait_until(settled, 30, "every fuzz connection to be gone")
    st = s.stats()
    retired = st["server"]["retired_rings"]
    assert retired["pages_allocated"] == retired["pages_freed"]
    for name in ("disk", "aligned"):
        sock, _ = connect(s.sock, name.encode())
        pattern = bytes(range(256)) * 16
        sock.sendall(request(CMD_WRITE, 4096, 4096, 1) + pattern)
        assert simple_reply(sock)[:2] == (0, 1)
        sock.sendall(request(CMD_READ, 4096, 4096, 2))
        assert simple_reply(sock, 4096) == (0, 2, pattern)
        rings = [r for d in s.stats()["devices"] for r in d["rings"]]
        assert all(r["in_flight_pages"] == 0 for r in rings)
        sock.close()
    print(
        f"\n{tally.inputs} mutated streams in {took:.1f} s ({tally.replies_bytes} reply bytes, "
        f"{tally.send_stalled} sends stalled, {tally.refused} refused); "
        f"rings retired {retired['rings']}, pages reclaimed at close {retired['pages_reclaimed']}"
    )
