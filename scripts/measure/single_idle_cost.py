"""Idle cost of N ``serve --single`` servers, one process per client as inetd starts them.

Usage: .venv/bin/python scripts/measure/single_idle_cost.py N T [blkback serve options]
Each server gets a socketpair client that negotiates and writes 4 KiB once, then idles; the
servers' CPU over T seconds is printed two ways: clock ticks (/proc/PID/stat) and exact run
time (/proc/PID/task/*/schedstat).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests/integration"))
from support import export_name, recv_exact, start_handshake  # noqa: E402

REQ = struct.Struct(">IHHQQI")
n, t = int(sys.argv[1]), float(sys.argv[2])
extra = sys.argv[3:]


def ticks_s(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    rest = raw[raw.rindex(b")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def run_s(pid: int) -> float:
    tasks = os.listdir(f"/proc/{pid}/task")
    return (
        sum(int(Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[0]) for t in tasks)
        / 1e9
    )


procs: list[subprocess.Popen[bytes]] = []
socks: list[socket.socket] = []
try:
    for _ in range(n):
        ours, theirs = socket.socketpair()
        procs.append(
            subprocess.Popen(
                [str(ROOT / ".venv/bin/blkback"), "serve", "-s", "--export", "d=memory:4M", *extra],
                stdin=theirs, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        theirs.close()
        socks.append(ours)
        start_handshake(ours)
        export_name(ours, b"")
        ours.sendall(REQ.pack(0x25609513, 0, 1, 1, 0, 4096) + b"x" * 4096)
        recv_exact(ours, 16)
    time.sleep(2)  # past the monitors' first second of fast sampling
    c0, r0, t0 = (
        sum(map(ticks_s, (p.pid for p in procs))),
        sum(run_s(p.pid) for p in procs),
        time.monotonic(),
    )
    time.sleep(t)
    c1, r1, t1 = (
        sum(map(ticks_s, (p.pid for p in procs))),
        sum(run_s(p.pid) for p in procs),
        time.monotonic(),
    )
    print(
        f"{n} idle --single servers {' '.join(extra)}: {100 * (c1 - c0) / (t1 - t0):.2f} % of a "
        f"core by ticks, {100 * (r1 - r0) / (t1 - t0):.2f} % by schedstat"
    )
finally:
    for s in socks:
        s.close()
    for p in procs:
        p.wait(30)
