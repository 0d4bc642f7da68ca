"""A libnbd client that holds N connections open and obeys commands on stdin.

Run with Debian's /usr/bin/python3 (which has the ``nbd`` module). Commands, one per line:
``write SIZE`` (every connection writes SIZE bytes at offset 0, in one request),
``read SIZE``, ``pread_past_end``, ``quit``. Answers ``ok`` or ``err ERRNO`` per command.
"""

from __future__ import annotations

import sys

import nbd

uris, n = sys.argv[1].split(","), int(sys.argv[2])
handles = []
for uri in uris:
    for _ in range(n):
        h = nbd.NBD()
        h.set_strict_mode(0)
        h.connect_uri(uri)
        handles.append(h)
print("ready", flush=True)
for line in sys.stdin:
    words = line.split()
    if not words or words[0] == "quit":
        break
    try:
        if words[0] == "write":
            size = int(words[1])
            for h in handles:
                h.pwrite(b"\xab" * size, 0)
        elif words[0] == "read":
            size = int(words[1])
            for h in handles:
                assert len(h.pread(size, 0)) == size
        elif words[0] == "pread_past_end":
            handles[0].pread(4096, handles[0].get_size())
        print("ok", flush=True)
    except nbd.Error as e:
        print(f"err {e.errno}", flush=True)
for h in handles:
    h.shutdown()
