"""Record what real NBD clients send: seeds for the fuzzers (run once; seeds are committed).

Usage: python -m tests.fuzz.capture SERVER_SOCKET PROXY_SOCKET OUT_DIR PREFIX

A Unix-socket proxy in front of a running server that writes each connection's
client-to-server bytes to ``OUT_DIR/PREFIX-N.bin`` (truncated to 64 KiB: the handshake and
the first requests are what matters). Stop it with SIGINT/SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path

LIMIT = 64 * 1024


def pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if record is not None and len(record) < LIMIT:
                record += data[: LIMIT - len(record)]
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main(argv: list[str]) -> int:
    server, proxy, out_dir, prefix = argv
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if os.path.exists(proxy):
        os.unlink(proxy)
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(proxy)
    lsock.listen(16)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    n = 0
    while True:
        client, _ = lsock.accept()
        upstream = socket.socket(socket.AF_UNIX)
        upstream.connect(server)
        record = bytearray()
        path = out / f"{prefix}-{n}.bin"
        n += 1

        def run(
            c: socket.socket = client,
            u: socket.socket = upstream,
            r: bytearray = record,
            p: Path = path,
        ) -> None:
            back = threading.Thread(target=pump, args=(u, c, None))
            back.start()
            pump(c, u, r)
            back.join()
            p.write_bytes(bytes(r))

        threading.Thread(target=run, daemon=True).start()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
