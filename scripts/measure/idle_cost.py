"""Idle cost: N connections that each wrote 4 KiB once, then idle; server CPU over T seconds.

Usage: .venv/bin/python scripts/measure/idle_cost.py SRC N T [blkback serve options]
SRC is the source tree whose server runs (e.g. src, or an older checkout's src).
"""
import os, subprocess, sys, tempfile, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests/integration/reliability"), str(ROOT / "tests/integration")]
from rsupport import connect, request, simple_reply
tree, n, t = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
src = str(Path(tree).resolve())
def cpu(pid):
    raw = open(f"/proc/{pid}/stat", "rb").read(); rest = raw[raw.rindex(b")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
def run_s(pid):  # exact run time of every thread (clock ticks charge a whole tick per wake-up)
    tasks = os.listdir(f"/proc/{pid}/task")
    return sum(int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0]) for t in tasks) / 1e9
with tempfile.TemporaryDirectory() as d:
    sock = f"{d}/s.sock"
    p = subprocess.Popen([sys.executable, "-m", "blkback", "serve", "--listen", f"unix:{sock}",
        "--export", "d=memory:64M", "--pressure", "off", "--control", f"{d}/c.sock", *sys.argv[4:]],
        env=dict(os.environ, PYTHONPATH=src), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not os.path.exists(sock): time.sleep(0.05)
        time.sleep(0.3)
        conns = []
        for i in range(n):
            s, _ = connect(sock, b"d"); conns.append(s)
            s.sendall(request(1, i * 4096, 4096, cookie=i) + b"x" * 4096); simple_reply(s)
        time.sleep(1.0)
        c0 = cpu(p.pid); r0 = run_s(p.pid); t0 = time.monotonic(); time.sleep(t)
        c1 = cpu(p.pid); r1 = run_s(p.pid); t1 = time.monotonic()
        print(f"{tree}: {n} idle connections: server CPU {100 * (c1 - c0) / (t1 - t0):.2f} % of a core over {t1 - t0:.1f} s"
              f" by clock ticks, {100 * (r1 - r0) / (t1 - t0):.2f} % by schedstat run time")
        for s in conns: s.close()
    finally:
        p.terminate(); p.wait()
