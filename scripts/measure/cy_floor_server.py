"""Run cy_floor.pyx's loop after blkback's own handshake: the compiled floor of an NBD loop.

floor_server.py is the least an *interpreted* loop can do per request; this is the same loop
compiled by Cython with direct ``read``/``writev`` calls instead of the socket module's
methods, to tell how much of a request's user time is the CPython call layer. A measurement
only: Cython is not a dependency of blkback. Build it once (Cython in a venv of its own):

    python3 -m venv /tmp/cyenv && /tmp/cyenv/bin/pip install cython setuptools
    (cd scripts/measure && /tmp/cyenv/bin/cythonize -i cy_floor.pyx)
    PYTHONPATH=scripts/measure .venv/bin/python scripts/measure/cy_floor_server.py SOCKET_PATH
    fio --ioengine=nbd --uri='nbd+unix:///disk?socket=SOCKET_PATH' --rw=randread --bs=4k ...

Like floor_server.py, a WRITE's payload beyond the staging buffer goes straight into the
export, so only the 4 KiB cells compare with a server that has a pool.
"""

from __future__ import annotations

import socket
import sys

import cy_floor  # type: ignore[import-not-found]  # built by cythonize, see above
from floor_server import SIZE, handshake, serve_forever

from blkback.protocol.transmission import Transmission


def serve(conn: socket.socket, mem: bytearray, reply: bytearray) -> None:
    negotiated = handshake(conn)
    if negotiated is None:
        return
    info, leftover = negotiated
    # A structured read reply's header is longer than a simple reply's 16 bytes.
    structured = len(Transmission(info).read_reply_header(1, 0, 4096)) > 16
    staging = bytearray(256 * 1024)
    staging[: len(leftover)] = leftover
    cy_floor.loop(conn.fileno(), staging, mem, reply, len(leftover), structured)


def main() -> None:
    mem = bytearray(SIZE)
    reply = bytearray(32 << 20)  # one buffer for every READ's data, as floor_server.py
    serve_forever(sys.argv[1], lambda conn: serve(conn, mem, reply))


if __name__ == "__main__":
    main()
