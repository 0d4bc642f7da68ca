"""The settings a server is started with: what ``serve``'s flags and ``--config`` file become.

Its own module so that a connection can name its server's settings without importing the
server (``server.server`` creates connections; ``server.connection`` declares what it needs of
its server as :class:`~blkback.server.connection.RingHost`).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Literal

from blkback.clock import NS_PER_S, NS_PER_US

DEFAULT_TCP = "tcp:127.0.0.1:10809"


@dataclass
class ServerConfig:
    """Settings fixed at start-up (runtime parameters live in :class:`Params`).

    Durations are integer nanoseconds, as every time inside blkback; the edges (command-line
    flags, JSON) carry their own unit in their names and convert once.
    """

    listen: list[str] = field(default_factory=lambda: [DEFAULT_TCP])
    # Listening sockets handed over already bound (systemd socket activation), served
    # besides ``listen``.
    listen_fds: list[int] = field(default_factory=list)
    control_path: str | None = None  # None: derived from the first listen address
    control_socket: bool = True  # False: no control socket (serve --single's default)
    metrics: str | None = None
    workers: int = 16
    max_requests_per_ring: int = 512
    max_connections: int = 1024
    handshake_timeout_ns: int = 10 * NS_PER_S
    idle_timeout_ns: int = 0  # 0: never
    io_timeout_ns: int = 60 * NS_PER_S
    chunk_pages: int = 256
    mlock: bool = False
    max_block: int = 32 * 1024 * 1024
    # Served even though only max_block is advertised, as nbdkit does (MAX_REQUEST).
    max_request: int = 64 * 1024 * 1024
    tls: Literal["off", "allow", "require"] = "off"
    tls_context: ssl.SSLContext | None = None
    max_option_bytes: int = 64 * 1024  # larger option payloads get REP_ERR_TOO_BIG
    max_options: int = 1000  # options per connection before it is dropped
    # Busy polling: after serving a batch, a ring may poll its socket before it sleeps in
    # recv, for an adaptive window of at most this long (core/polling.py: the window follows
    # the gaps between requests, and a ring spins only while that costs it no more CPU and
    # wall time per request than sleeping). 50 us is Linux's recommended
    # net.core.busy_read. 0: never.
    poll_ns: int = 50 * NS_PER_US
    # At most this many rings poll at once, and none while the server has more connections
    # than that. Default: half the CPUs (at least 1), so that polling rings never take every
    # core from their clients, nor the GIL from many other rings.
    max_pollers: int = 0
    # SO_SNDBUF of a Unix-socket connection (the kernel doubles it for its bookkeeping and
    # caps it at net.core.wmem_max). A Unix socket's replies queue against the *sender's*
    # buffer only, 208 KiB by default: a 1 MiB read reply then sleeps and wakes the ring
    # five times, and the ring cannot copy the next read while it waits. 512 KiB lets a
    # whole 1 MiB reply go in one call (docs/data-path.md section 5). TCP sockets keep the
    # kernel's autotuning, which a fixed SO_SNDBUF would switch off. 0: the kernel's default.
    send_buffer: int = 512 * 1024
