"""The codec against a real client: nbdinfo (libnbd) talking to a tiny blocking test server.

The server below is test scaffolding only: a thread that accepts Unix-socket connections and
runs ServerHandshake, then Transmission over a bytearray. It records what each connection
negotiated so the tests can check the client really exercised the paths.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blkback.errors import ProtocolError, RequestError
from blkback.protocol.constants import STATE_HOLE, STATE_ZERO, Cmd, TFlag
from blkback.protocol.handshake import (
    ExportInfo,
    HandshakeState,
    Negotiated,
    ServerHandshake,
    StaticCatalog,
)
from blkback.protocol.transmission import REQUEST_SIZE, Transmission, unpack_request

pytestmark = pytest.mark.skipif(shutil.which("nbdinfo") is None, reason="needs nbdinfo")

SIZE = 1024 * 1024
DATA_END = 64 * 1024  # [0, DATA_END) holds data, the rest is a hole reading as zeroes
EXPORTS = [
    ExportInfo(
        "disk",
        SIZE,
        TFlag.SEND_FLUSH
        | TFlag.SEND_FUA
        | TFlag.SEND_TRIM
        | TFlag.SEND_WRITE_ZEROES
        | TFlag.SEND_DF
        | TFlag.SEND_CACHE
        | TFlag.CAN_MULTI_CONN,
        min_block=512,
        description="test disk",
    ),
    ExportInfo("small", 8192, TFlag.READ_ONLY),
]


class TinyServer:
    """Serves connections one at a time until closed."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.listener.settimeout(0.2)
        self.data = bytearray(b"\xa5" * DATA_END + bytes(SIZE - DATA_END))
        self.negotiated: list[Negotiated] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.listener.close()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                try:
                    self._connection(conn)
                except (ConnectionError, TimeoutError):
                    pass  # clients may hang up at any point
                except BaseException as exc:
                    self.errors.append(exc)

    def _connection(self, conn: socket.socket) -> None:
        hs = ServerHandshake(StaticCatalog(EXPORTS))
        conn.sendall(hs.initial_bytes())
        while hs.state is HandshakeState.IN_PROGRESS:
            out = hs.feed(conn.recv(65536))
            if out:
                try:
                    conn.sendall(out)
                except BrokenPipeError:
                    return  # e.g. the client closed right after OPT_ABORT
        if hs.state is HandshakeState.CLOSED:
            if hs.error is not None:
                raise hs.error
            return
        assert hs.negotiated is not None
        self.negotiated.append(hs.negotiated)
        self._transmission(conn, Transmission(hs.negotiated), bytearray(hs.leftover))

    def _transmission(self, conn: socket.socket, tx: Transmission, buf: bytearray) -> None:
        def need(n: int) -> bool:
            while len(buf) < n:
                chunk = conn.recv(65536)
                if not chunk:
                    return False
                buf.extend(chunk)
            return True

        while need(REQUEST_SIZE):
            flags, cmd, cookie, offset, length = unpack_request(buf)
            del buf[:REQUEST_SIZE]
            try:
                tx.check(flags, cmd, offset, length)
            except RequestError as exc:
                if cmd == Cmd.WRITE:
                    if not need(length):
                        return
                    del buf[:length]
                conn.sendall(tx.error_reply(cookie, exc.errno, str(exc)))
                continue
            except ProtocolError:
                return
            if cmd == Cmd.DISC:
                return
            if cmd == Cmd.READ:
                payload = bytes(self.data[offset : offset + length])
                conn.sendall(tx.read_reply_header(cookie, offset, length) + payload)
            elif cmd == Cmd.WRITE:
                if not need(length):
                    return
                self.data[offset : offset + length] = buf[:length]
                del buf[:length]
                conn.sendall(tx.simple_reply(cookie))
            elif cmd == Cmd.BLOCK_STATUS:
                end = offset + length
                if offset < DATA_END:
                    extents = [(min(end, DATA_END) - offset, 0)]
                    if end > DATA_END:
                        extents.append((end - DATA_END, STATE_HOLE | STATE_ZERO))
                else:
                    extents = [(length, STATE_HOLE | STATE_ZERO)]
                ids = list(tx.negotiated.meta_contexts)
                conn.sendall(
                    b"".join(
                        tx.chunk_block_status(
                            cookie,
                            cid,
                            extents,
                            done=i == len(ids) - 1,
                            req_one=bool(flags & 8),
                            request_length=length,
                        )
                        for i, cid in enumerate(ids)
                    )
                )
            else:
                conn.sendall(tx.simple_reply(cookie))


@pytest.fixture
def server() -> Iterator[tuple[TinyServer, str]]:
    with tempfile.TemporaryDirectory(prefix="nbdp") as tmp:
        path = str(Path(tmp) / "s")
        srv = TinyServer(path)
        try:
            yield srv, f"nbd+unix:///{{}}?socket={path}"
        finally:
            srv.close()
        assert srv.errors == []


def nbdinfo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nbdinfo", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_nbdinfo_json_reports_size_and_flags(server: tuple[TinyServer, str]) -> None:
    srv, uri = server
    res = nbdinfo("--json", uri.format("disk"))
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    (export,) = info["exports"]
    assert export["export-size"] == SIZE
    assert export["is_read_only"] is False
    assert export["can_flush"] is True
    assert export["can_df"] is True
    assert export["block_size_minimum"] == 512
    assert export["contexts"] == ["base:allocation"]
    assert "content" in export  # nbdinfo read the first sectors: structured READ replies
    assert info["protocol"] == "newstyle-fixed"
    assert srv.negotiated[-1].structured_replies


def test_nbdinfo_default_export_and_read_only(server: tuple[TinyServer, str]) -> None:
    _srv, uri = server
    res = nbdinfo("--json", uri.format("small"))
    assert res.returncode == 0, res.stderr
    (export,) = json.loads(res.stdout)["exports"]
    assert export["export-size"] == 8192
    assert export["is_read_only"] is True
    res = nbdinfo("--size", uri.format(""))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(SIZE)


def test_nbdinfo_list(server: tuple[TinyServer, str]) -> None:
    _, uri = server
    res = nbdinfo("--list", "--json", uri.format(""))
    assert res.returncode == 0, res.stderr
    names = {e["export-name"]: e for e in json.loads(res.stdout)["exports"]}
    assert set(names) == {"disk", "small"}
    assert names["disk"]["export-size"] == SIZE


def test_nbdinfo_map_uses_block_status(server: tuple[TinyServer, str]) -> None:
    srv, uri = server
    res = nbdinfo("--map", "--json", uri.format("disk"))
    assert res.returncode == 0, res.stderr
    extents = json.loads(res.stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in extents] == [
        (0, DATA_END, 0),
        (DATA_END, SIZE - DATA_END, STATE_HOLE | STATE_ZERO),
    ]
    assert srv.negotiated[-1].meta_contexts == {1: "base:allocation"}


def test_nbdinfo_unknown_export_fails_cleanly(server: tuple[TinyServer, str]) -> None:
    _, uri = server
    res = nbdinfo("--size", uri.format("missing"))
    assert res.returncode != 0
    assert "missing" in res.stderr or "unknown" in res.stderr.lower()


NBDSH_SCRIPT = """
import errno, nbd
h.set_strict_mode(0)
assert h.pread(512, 0) == b"\\xa5" * 512
for args, want in [((512, SIZE), errno.EINVAL), ((100, 1), errno.EINVAL)]:
    try:
        h.pread(*args)
    except nbd.Error as e:
        assert e.errnum == want, (args, e.errnum, e.string)
    else:
        raise AssertionError(args)
try:
    h.pwrite(b"x" * 512, SIZE)
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e.errnum
else:
    raise AssertionError("write past the end succeeded")
h.pwrite(b"\\x5a" * 512, 512, nbd.CMD_FLAG_FUA)
assert h.pread(512, 512) == b"\\x5a" * 512
h.zero(4096, 0)
h.trim(4096, 4096)
h.flush()
h.cache(4096, 0)
"""


@pytest.mark.skipif(shutil.which("nbdsh") is None, reason="needs nbdsh")
def test_nbdsh_errors_are_structured_and_connection_survives(
    server: tuple[TinyServer, str],
) -> None:
    srv, uri = server
    script = NBDSH_SCRIPT.replace("SIZE", str(SIZE))
    res = subprocess.run(
        ["/usr/bin/nbdsh", "-u", uri.format("disk"), "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    assert res.returncode == 0, res.stderr
    assert srv.data[512:1024] == b"\x5a" * 512
