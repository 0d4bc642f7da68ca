"""The least an interpreted NBD server can do per request: the floor blkback's ring is held to.

Not a server: after blkback's own handshake it serves READ and WRITE of a memory export with
one ``recv_into`` into a staging buffer, one ``unpack_from``, one slice copy and one
``sendmsg`` per request: no pool, no pass, no statistics, no checks. docs/data-path.md
section 6 compares its CPU per request (about 16,000 instructions and 3-5 us of user time
at QD1 4 KiB here) with blkback's and nbdkit's.

Usage (one client at a time; SPIN=1 busy-polls the socket instead of sleeping in recv):
    .venv/bin/python scripts/measure/floor_server.py SOCKET_PATH
    fio --ioengine=nbd --uri='nbd+unix:///disk?socket=SOCKET_PATH' --rw=randread --bs=4k ...
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
from collections.abc import Callable

from blkback.protocol.constants import TFlag
from blkback.protocol.handshake import (
    ExportInfo,
    HandshakeState,
    Negotiated,
    ServerHandshake,
    StaticCatalog,
)
from blkback.protocol.transmission import Transmission

SIZE = 1 << 30
REQUEST = struct.Struct(">IHHQQI")
OK_REPLY = struct.Struct(">IIQ")
SIMPLE_REPLY_MAGIC = 0x67446698
CATALOG = StaticCatalog([ExportInfo("disk", SIZE, int(TFlag.SEND_FLUSH))])


def handshake(conn: socket.socket) -> tuple[Negotiated, bytes] | None:
    """blkback's own handshake on ``conn``: what was negotiated and the bytes read past it."""
    hs = ServerHandshake(CATALOG)
    conn.sendall(hs.initial_bytes())
    while hs.state is HandshakeState.IN_PROGRESS:
        out = hs.feed(conn.recv(65536))
        if out:
            conn.sendall(out)
    if hs.negotiated is None:
        return None
    return hs.negotiated, hs.leftover


def serve_forever(path: str, serve_one: Callable[[socket.socket], None]) -> None:
    """Listen on the Unix socket ``path`` and serve one client at a time with ``serve_one``."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(4)
    while True:
        conn, _ = listener.accept()
        with conn:
            serve_one(conn)


def serve(conn: socket.socket, mem: memoryview, spin: bool) -> None:
    negotiated = handshake(conn)
    if negotiated is None:
        return
    info, leftover = negotiated
    read_header = Transmission(info).read_reply_header
    staging = bytearray(256 * 1024)
    view = memoryview(staging)
    reply_data = memoryview(bytearray(32 << 20))  # one buffer for every READ's data
    end = len(leftover)
    staging[:end] = leftover
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    start = 0
    while True:
        if end - start < REQUEST.size:
            if start:
                staging[: end - start] = view[start:end]
                end -= start
                start = 0
            while spin and not poller.poll(0):
                pass
            n = conn.recv_into(view[end:])
            if not n:
                return
            end += n
            continue
        _magic, _flags, cmd, cookie, offset, length = REQUEST.unpack_from(view, start)
        start += REQUEST.size
        if cmd == 0:  # READ
            data = reply_data[:length]
            data[:] = mem[offset : offset + length]
            conn.sendmsg([read_header(cookie, offset, length), data])
        elif cmd == 1:  # WRITE: the staged part, then the rest straight into the export
            staged = min(end - start, length)
            mem[offset : offset + staged] = view[start : start + staged]
            got = staged
            while got < length:
                got += conn.recv_into(mem[offset + got : offset + length])
            start += staged
            if start >= end:
                start = end = 0
            conn.sendmsg([OK_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)])
        elif cmd == 2:  # DISC
            return
        else:
            conn.sendmsg([OK_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)])


def main() -> None:
    mem = memoryview(bytearray(SIZE))
    spin = os.environ.get("SPIN") == "1"
    serve_forever(sys.argv[1], lambda conn: serve(conn, mem, spin))


if __name__ == "__main__":
    main()
