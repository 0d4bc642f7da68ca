"""Memory: when pages cannot be allocated the request fails with ENOMEM at once, the ring
backs off, other requests go on, and later requests succeed.

Allocation failure is provoked for real: the server's address-space limit (``RLIMIT_AS``,
soft) is set just above what it has mapped, so mapping new pool chunks fails with ENOMEM.
"""

from __future__ import annotations

import socket
import subprocess
import time

from rsupport import CMD_READ, CMD_WRITE, connect, request, simple_reply
from support import need_tool, wait_until

ENOMEM = 12
MiB = 2**20


def _vm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1])
    raise AssertionError("no VmSize")


def _limit_as(pid: int, soft: str) -> None:
    subprocess.run(["prlimit", f"--pid={pid}", f"--as={soft}:unlimited"], check=True)


def test_allocation_failure_gives_enomem_backs_off_and_recovers(serve) -> None:
    need_tool("prlimit")
    s = serve("mem=memory:64M")
    pid = s.proc.pid
    sock, _ = connect(s.sock, b"mem")
    sock.sendall(request(CMD_WRITE, 0, 4096, 1) + b"\x77" * 4096)
    assert simple_reply(sock)[0] == 0
    s.ctl("pressure", "--level", "critical")  # pools squeezed: the ring has to allocate again
    _limit_as(pid, str((_vm_kib(pid) + 16 * 1024) * 1024))
    try:
        waits = []
        for i in range(6):
            t0 = time.monotonic()
            sock.sendall(request(CMD_READ, 0, 32 * MiB, 10 + i))
            err, cookie, _ = simple_reply(sock, 32 * MiB)
            waits.append(time.monotonic() - t0)
            assert (err, cookie) == (ENOMEM, 10 + i)
        assert max(waits) < 2, waits  # never waits for a page
        # Small requests are still served meanwhile (a few pages can be had).
        sock.sendall(request(CMD_READ, 0, 4096, 20))
        assert simple_reply(sock, 4096) == (0, 20, b"\x77" * 4096)
    finally:
        _limit_as(pid, "unlimited")
    # Later requests succeed, on the old connection and on new ones.
    sock.sendall(request(CMD_READ, 0, 16 * MiB, 30))
    err, _, data = simple_reply(sock, 16 * MiB)
    assert err == 0 and data[:4096] == b"\x77" * 4096
    rings = s.rings()
    ring = next(r for r in rings if r["requests"]["alloc_failures"])
    assert ring["requests"]["alloc_failures"] >= 6
    assert ring["requests"]["alloc_backoff_ms"] >= 6  # 1 ms doubling
    sock.close()
    new, _ = connect(s.sock, b"mem")
    new.sendall(request(CMD_READ, 0, 16 * MiB, 40))
    assert simple_reply(new, 16 * MiB)[0] == 0
    new.close()
    wait_until(lambda: s.stats()["server"]["connections"] == 0, 5, "both connections closed")
    st = s.stats()
    assert (
        st["server"]["retired_rings"]["pages_allocated"]
        == st["server"]["retired_rings"]["pages_freed"]
    )
    assert socket
