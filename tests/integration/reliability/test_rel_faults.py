"""Faults: injected EIO and a full disk give the right NBD error; the connection is kept."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from rsupport import CMD_READ, CMD_WRITE, connect, libnbd, request, simple_reply
from support import need_root, need_tool

from blkback.core.params import Params
from blkback.server.server import Server
from blkback.server.settings import ServerConfig
from blkback.storage.base import PlainDescriptor
from blkback.storage.spec import open_storage

MiB = 2**20

# Counts errno names of writes/reads through one libnbd connection, then checks the
# connection still works and that data written without an error reads back.
PROBE = r"""
import nbd, sys, errno, json
h = nbd.NBD(); h.connect_uri(sys.argv[1])
n, size = int(sys.argv[2]), h.get_size()
out = {"write": {}, "read": {}, "verified": 0, "mismatch": 0}
good = {}
for i in range(n):
    off = (i * 4096) % size
    data = bytes([i % 251 + 1]) * 4096
    try:
        h.pwrite(data, off)
        good[off] = data
        k = "ok"
    except nbd.Error as e:
        k = errno.errorcode.get(e.errnum, str(e.errnum))
    out["write"][k] = out["write"].get(k, 0) + 1
for off, data in good.items():
    for attempt in range(20):  # reads may fail too (error filter): retry
        try:
            got = h.pread(4096, off)
            k = "ok"
        except nbd.Error as e:
            k = errno.errorcode.get(e.errnum, str(e.errnum))
        out["read"][k] = out["read"].get(k, 0) + 1
        if k == "ok":
            out["verified" if got == data else "mismatch"] += 1
            break
try:
    h.flush()
    out["flush"] = "ok"
except nbd.Error as e:
    out["flush"] = errno.errorcode.get(e.errnum, str(e.errnum))
h.shutdown()
print(json.dumps(out))
"""


def _probe(uri: str, n: int) -> dict:  # type: ignore[type-arg]
    import json

    res = libnbd(PROBE, uri, str(n))
    assert res.returncode == 0, res.stderr
    out: dict = json.loads(res.stdout)  # type: ignore[type-arg]
    return out


def test_error_filter_gives_eio_and_keeps_the_connection(serve) -> None:
    need_tool("/usr/bin/python3")
    s = serve("bad=memory:4M,error=0.5,error-seed=1", "good=memory:4M")
    out = _probe(s.uri("bad"), 200)
    assert set(out["write"]) == {"ok", "EIO"}, out
    assert 50 < out["write"]["EIO"] < 150, out  # p = 0.5
    assert out["read"].get("EIO", 0) > 0 and set(out["read"]) <= {"ok", "EIO"}, out
    assert out["mismatch"] == 0 and out["verified"] == out["write"]["ok"], out
    # The other export, on the same server at the same time, saw nothing of it.
    clean = _probe(s.uri("good"), 200)
    assert clean["write"] == {"ok": 200} and clean["verified"] == 200, clean
    stats = s.stats()
    by_name = {d["name"]: d for d in stats["devices"]}
    assert stats["server"]["connections"] == 0
    assert all(not d["rings"] for d in by_name.values())  # every ring is gone


@pytest.fixture
def tiny_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 4 MiB ext4 filesystem, loop-mounted; always unmounted and detached."""
    need_root("loop-mounting a filesystem")
    need_tool("mkfs.ext4", "losetup", "mount", "umount")
    image = tmp_path / "tiny.ext4"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(4 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    mounted = False
    try:
        subprocess.run(["mount", dev, str(mnt)], check=True, capture_output=True)
        mounted = True
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)


@pytest.mark.root
def test_full_disk_gives_enospc_and_keeps_the_connection(serve, tiny_fs: Path) -> None:
    need_tool("/usr/bin/python3")
    s = serve(f"full=file:{tiny_fs}/big.img:16M", "other=memory:4M")
    # 16 MiB of distinct 4 KiB writes on a 4 MiB filesystem: the tail must be ENOSPC.
    out = _probe(s.uri("full"), 4096)
    assert out["write"].get("ENOSPC", 0) > 1000, out
    assert set(out["write"]) == {"ok", "ENOSPC"}, out
    assert out["write"]["ok"] > 100, out
    assert out["read"] == {"ok": out["write"]["ok"]} and out["mismatch"] == 0, out
    clean = _probe(s.uri("other"), 100)
    assert clean["write"] == {"ok": 100}, clean
    s.stop()  # the server closes the file before the filesystem is unmounted


def test_a_failing_descriptor_on_the_fast_path_gives_an_error_reply(tmp_path: Path) -> None:
    # The memfd backend's requests go straight to preadv/pwritev on its descriptor. Put
    # /dev/full under that descriptor: the kernel then fails every write with ENOSPC (and
    # reads give zeroes). Each write must get its error reply, and the connection must live.
    storage = open_storage("memfd:8M")
    access = storage.direct_access()
    assert isinstance(access, PlainDescriptor)
    full = os.open("/dev/full", os.O_RDWR)
    try:
        os.dup2(full, access.fd)
    finally:
        os.close(full)
    path = str(tmp_path / "nbd.sock")
    config = ServerConfig(listen=[f"unix:{path}"], control_path=str(tmp_path / "c.sock"))
    server = Server([("d", "memfd:8M", storage)], params=Params(), config=config)
    server.start()
    try:
        sock, _ = connect(path, b"d")
        sock.settimeout(10)
        with sock:
            # Pipelined: one group of four writes and a read.
            burst = b"".join(
                request(CMD_WRITE, i * 4096, 4096, cookie=i) + b"\xaa" * 4096 for i in range(4)
            )
            sock.sendall(burst + request(CMD_READ, 0, 4096, cookie=9))
            errors = [simple_reply(sock)[:2] for _ in range(4)]
            assert errors == [(28, i) for i in range(4)]  # NBD_ENOSPC, every cookie
            assert simple_reply(sock, 4096) == (0, 9, bytes(4096))
            sock.sendall(request(CMD_READ, 4096, 4096, cookie=10))
            assert simple_reply(sock, 4096) == (0, 10, bytes(4096))  # still connected
    finally:
        server.stop()
