"""The server: the only code that touches sockets, threads and the wall clock.

One OS thread per NBD connection (a *ring*), blocking syscalls that release the GIL, batched
request parsing and one ``sendmsg`` per batch: the design that measured fastest on this kind
of machine (nbd-notes.md §5). Backends that may block (files, delay/rate filters) get a small
per-ring worker pool so that many requests are in flight at once, as in the kernel's ring.
"""

from __future__ import annotations
