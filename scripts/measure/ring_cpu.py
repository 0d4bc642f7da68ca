"""CPU of the ring thread per request, user and system, with an in-process client.

Usage: .venv/bin/python scripts/measure/ring_cpu.py read|write QD N [PARAM=VALUE...]
The client keeps QD requests in flight, one send per request. BLKBACK_PURE_PYTHON=1 measures
the pure-Python modules; PYTHONPATH=OTHER/src another tree.
"""
import os, socket, sys, tempfile, threading, time, random
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests/integration/reliability"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests/integration"))
from rsupport import connect, request
from blkback.core.params import Params
from blkback.server.server import Server
from blkback.server.settings import ServerConfig
from blkback.storage.spec import open_storage
kind, qd, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
extra = dict(a.split("=") for a in sys.argv[4:])
bs = int(extra.pop("bs", 4096))
def tcpu(tid):
    raw = open(f"/proc/self/task/{tid}/stat", "rb").read(); rest = raw[raw.rindex(b")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK") if not os.environ.get("SPLIT") else (int(rest[11]) / 100, int(rest[12]) / 100)
with tempfile.TemporaryDirectory() as d:
    import dataclasses
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    cfg = ServerConfig(listen=[f"unix:{d}/s"], control_path=f"{d}/c", **({"poll_ns": 0} if "poll_ns" in names else {"poll_us": 0}))
    srv = Server([("d", "memory:256M", open_storage("memory:256M"))], params=Params(**{k: int(v) for k, v in extra.items()}), config=cfg)
    srv.start()
    try:
        s, _ = connect(f"{d}/s", b"d")
        cmd = 0 if kind == "read" else 1
        payload = b"\xab" * bs if cmd == 1 else b""
        reply = 16 + (bs if cmd == 0 else 0)
        rng = random.Random(1)
        reqs = [request(cmd, rng.randrange(0, (256 << 20) // bs) * bs, bs, cookie=i) + payload for i in range(1024)]
        buf = bytearray(4 << 20)
        def run(total):
            sent = got_bytes = 0
            for _ in range(qd):
                s.sendall(reqs[sent % 1024]); sent += 1
            done = 0
            while done < total:
                got_bytes += s.recv_into(buf)
                k = got_bytes // reply; got_bytes -= k * reply; done += k
                for _ in range(min(k, total + qd - sent)):
                    s.sendall(reqs[sent % 1024]); sent += 1
            # drain
            while got_bytes < (sent - done) * reply:
                got_bytes += s.recv_into(buf)
        run(2000)
        tid = next(t.native_id for t in threading.enumerate() if t.name.startswith("ring-"))
        os.environ["SPLIT"] = "1"; u0, s0 = tcpu(tid); run(n); u1, s1 = tcpu(tid); print(f"user {1e6*(u1-u0)/n:.2f} sys {1e6*(s1-s0)/n:.2f}", end=" "); c0, c1 = 0, (u1 - u0) + (s1 - s0)
        st = srv.stats()["devices"][0]["rings"][0]["requests"]
        print(f"{kind} bs={bs} qd={qd} {extra}: ring thread {1e6 * (c1 - c0) / n:.2f} us/req, {(st['rd'] + st['wr']) / st['passes']:.1f} req/pass")
        s.close()
    finally:
        srv.stop()
