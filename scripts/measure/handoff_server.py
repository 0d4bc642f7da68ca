"""The interpreted floor server (floor_server.py) on threads that hand the socket to each other.

A QD1 study, not a server: nbdkit's default configuration serves more 4 KiB requests at QD1
than one thread can because while one thread serves a request, the next already waits in
``recv`` (docs/data-path.md §6 and §9). Here THREADS threads (default 2) take turns: each
receives one request under a read lock, lets the next thread receive, serves the request
and sends its reply under a write lock. No pool, no pass, as in floor_server.py.

Usage (one client at a time):
    THREADS=2 .venv/bin/python scripts/measure/handoff_server.py SOCKET_PATH
    fio --ioengine=nbd --uri='nbd+unix:///disk?socket=SOCKET_PATH' --rw=randwrite --bs=4k ...
"""

from __future__ import annotations

import os
import socket
import sys
import threading

from floor_server import OK_REPLY, REQUEST, SIMPLE_REPLY_MAGIC, handshake, serve_forever

from blkback.protocol.transmission import Transmission

C_READ, C_WRITE, C_DISC = 0, 1, 2


def serve(conn: socket.socket, mem: memoryview, nthreads: int) -> None:
    negotiated = handshake(conn)
    if negotiated is None:
        return
    info, leftover = negotiated
    if leftover:  # fio sends nothing before the handshake's last reply
        raise RuntimeError("bytes past the handshake")
    read_header = Transmission(info).read_reply_header
    read_lock = threading.Lock()
    write_lock = threading.Lock()
    done = threading.Event()

    def reply(bufs: list[bytes | memoryview]) -> None:
        with write_lock:
            conn.sendmsg(bufs)

    def turn(hv: memoryview, buf: memoryview) -> None:
        while not done.is_set():
            with read_lock:  # this thread's turn to receive
                if done.is_set():
                    return
                if conn.recv_into(hv, REQUEST.size, socket.MSG_WAITALL) < REQUEST.size:
                    done.set()
                    return
                _m, _f, cmd, cookie, offset, length = REQUEST.unpack_from(hv, 0)
                if cmd == C_WRITE:
                    conn.recv_into(buf[:length], length, socket.MSG_WAITALL)
            if cmd == C_READ:
                data = buf[:length]
                data[:] = mem[offset : offset + length]
                reply([read_header(cookie, offset, length), data])
            elif cmd == C_WRITE:
                mem[offset : offset + length] = buf[:length]
                reply([OK_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)])
            elif cmd == C_DISC:
                done.set()
                conn.shutdown(socket.SHUT_RDWR)
                return
            else:
                reply([OK_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)])

    threads = [
        threading.Thread(
            target=turn,
            args=(memoryview(bytearray(REQUEST.size)), memoryview(bytearray(32 << 20))),
        )
        for _ in range(nthreads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> None:
    mem = memoryview(bytearray(1 << 30))
    nthreads = int(os.environ.get("THREADS", "2"))
    serve_forever(sys.argv[1], lambda conn: serve(conn, mem, nthreads))


if __name__ == "__main__":
    main()
