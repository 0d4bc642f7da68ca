"""Why a large write is stored apart: 1 MiB writes stored on the receiving thread or another.

Not a server: after blkback's handshake (``floor_server.py``) it serves 1 MiB WRITEs of a
memory export, receiving each payload into one of ``NBUF`` 1 MiB buffers, and stores it:

* ``MODE=serial``: on the receiving thread, by a slice assignment (the GIL held), then replies;
* ``MODE=thread``: on a store thread, by ``ctypes.memmove`` (the GIL released), which replies
  and frees the buffer while the receiving thread takes the next request.

docs/data-path.md section 8 compares their throughput and CPU per request with nbdkit's.
Usage (one client at a time):
    MODE=thread .venv/bin/python scripts/measure/store_thread_server.py SOCKET_PATH
    fio --ioengine=nbd --uri='nbd+unix:///disk?socket=SOCKET_PATH' --rw=write --bs=1M ...
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from floor_server import OK_REPLY, REQUEST, SIMPLE_REPLY_MAGIC, SIZE, handshake, serve_forever

MIB = 1 << 20
FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
CMD_WRITE, CMD_DISC = 1, 2


def _address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class Store:
    def __init__(self, mode: str, nbuf: int) -> None:
        self.mode = mode
        self.export = mmap.mmap(-1, SIZE, flags=FLAGS)
        self.export_addr = _address(self.export)
        self.bufs = [mmap.mmap(-1, MIB, flags=FLAGS) for _ in range(nbuf)]
        self.buf_addrs = [_address(b) for b in self.bufs]

    def serve(self, conn: socket.socket) -> None:
        negotiated = handshake(conn)
        if negotiated is None:
            return
        header = memoryview(bytearray(REQUEST.size))
        free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for k in range(len(self.bufs)):
            free.put(k)
        work: queue.SimpleQueue[tuple[int, int, int, int] | None] = queue.SimpleQueue()
        send_lock = threading.Lock()

        def reply(cookie: int) -> None:
            with send_lock:
                conn.send(OK_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))

        def store() -> None:
            while (item := work.get()) is not None:
                k, offset, length, cookie = item
                ctypes.memmove(self.export_addr + offset, self.buf_addrs[k], length)
                reply(cookie)
                free.put(k)

        storer = threading.Thread(target=store, daemon=True)
        storer.start()
        try:
            while True:
                _recv_exact(conn, header)
                _magic, _flags, cmd, cookie, offset, length = REQUEST.unpack_from(header)
                if cmd == CMD_DISC:
                    return
                if cmd != CMD_WRITE or length > MIB:
                    reply(cookie)
                    continue
                k = free.get()
                _recv_exact(conn, memoryview(self.bufs[k])[:length])
                if self.mode == "thread":
                    work.put((k, offset, length, cookie))
                    continue
                self.export[offset : offset + length] = memoryview(self.bufs[k])[:length]
                reply(cookie)
                free.put(k)
        except (EOFError, ConnectionError):
            pass
        finally:
            work.put(None)
            storer.join()


def _recv_exact(conn: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if not n:
            raise EOFError
        got += n


def main() -> None:
    store = Store(os.environ.get("MODE", "thread"), int(os.environ.get("NBUF", "3")))
    serve_forever(sys.argv[1], store.serve)


if __name__ == "__main__":
    main()
