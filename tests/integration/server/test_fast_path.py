"""The server's fast path (groups of pipelined requests) against libnbd, byte for byte.

Mixed request sizes, 16 in flight, unaligned offsets, with and without structured replies:
groups mix one-page and many-page requests, writes whose payload is staged with the headers
and writes received straight into their pages. Everything written must read back, and every
page must be back in the pool afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from support import need_tool

USR = "/usr/bin"

# argv: URI, structured (1/0), seed. Prints {"requests": n, "mismatches": [...], "sr": bool}.
SCRIPT = r"""
import json, random, sys
import nbd

uri, want_sr, seed = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
h = nbd.NBD()
h.set_request_structured_replies(want_sr)
h.connect_uri(uri)
size = h.get_size()
rng = random.Random(seed)
sizes = [512, 4096, 4096, 4096, 4096, 5000, 12288, 65536, 1 << 20, 3 << 20]
regions = []
off = rng.randrange(0, 4096)
while True:
    n = rng.choice(sizes)
    if off + n > size:
        break
    regions.append((off, n, bytes(rng.getrandbits(8) for _ in range(64)) * (n // 64 + 1)))
    off += n + rng.choice([0, 0, 1, 511, 4095])

def pipelined(issue):
    cookies = []
    for item in regions:
        while h.aio_in_flight() >= 16:
            h.poll(-1)
        cookies.append(issue(item))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)

pipelined(lambda r: h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(r[2][: r[1]])), r[0]))
bufs = {}
def read(r):
    bufs[r[0]] = nbd.Buffer(r[1])
    return h.aio_pread(bufs[r[0]], r[0])
pipelined(read)
bad = [o for o, n, data in regions if bytes(bufs[o].to_bytearray()) != data[:n]]
print(json.dumps({"requests": 2 * len(regions), "mismatches": bad[:10],
                  "sr": h.get_structured_replies_negotiated()}))
h.shutdown()
"""


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_pipelined_mixed_sizes_read_back_exactly(serve, structured: bool) -> None:  # type: ignore[no-untyped-def]
    need_tool(f"{USR}/python3")
    s = serve("disk=memory:192M")
    res = subprocess.run(
        [f"{USR}/python3", "-c", SCRIPT, s.uri(), "1" if structured else "0", "7"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": f"{USR}:{os.environ.get('PATH', '')}"},
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["sr"] is structured
    assert out["requests"] > 200, out
    assert out["mismatches"] == [], out
    rings = [r for d in s.stats()["devices"] for r in d["rings"]]
    assert all(r["in_flight_pages"] == 0 for r in rings), rings
