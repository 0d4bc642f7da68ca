"""Serve block devices over NBD from per-connection page pools.

With no arguments: one 1 GiB in-memory export named ``disk`` on 127.0.0.1:10809
(``nbd://127.0.0.1/disk``), the default runtime parameters, and a control socket for
``blkback ctl``.

Export specs (``--export NAME=SPEC``):
  memory:SIZE              sparse RAM disk in the server's memory (pages on first write)
  memfd:SIZE               the same in a memfd (shmem; every access is a syscall)
  file:PATH[:SIZE]         a file (created sparse at SIZE if missing) or block device
  null:SIZE                writes discarded, reads zero: an emulated remote volume
followed by options: ``,readonly``, and filters stacked in order, like nbdkit's:
``,delay=10ms`` ``,delay-read=`` ``,delay-write=`` ``,rate=40M`` (bytes/s)
``,error=0.01`` ``,error-range=OFF-END`` ``,error-ops=read,write``.

Runtime parameters (``--param NAME=VALUE``, later ``blkback ctl set``):
  max_buffer_pages (1024), buffer_squeeze_duration_ms (10), lru_interval_ms (100),
  batch_free_pages (10), log_stats (0), squeeze_scope (device|global),
  squeeze_wake (1), squeeze_policy (kernel|graded).

Examples:
  blkback serve
  blkback serve --listen unix:/run/nbd.sock --export vol=null:10G,rate=40M,delay=2ms
  blkback serve --export a=file:/var/lib/a.img:8G --export b=memory:512M,readonly
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

from blkback.core.params import Params
from blkback.errors import ConfigError

if TYPE_CHECKING:
    from blkback.core.policy import PressureLevel
    from blkback.server.server import Server

log = logging.getLogger("blkback.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``serve``'s options."""
    parser.add_argument(
        "--listen",
        action="append",
        metavar="unix:PATH|tcp:HOST:PORT",
        help="where to accept NBD clients (repeatable; default tcp:127.0.0.1:10809)",
    )
    parser.add_argument(
        "--export",
        action="append",
        metavar="NAME=SPEC",
        help="an export (repeatable; default disk=memory:1G); the first is the default export",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a runtime parameter at start (repeatable)",
    )
    parser.add_argument(
        "--control", metavar="PATH", help="control socket for 'blkback ctl' (default per user)"
    )
    parser.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus /metrics")
    parser.add_argument(
        "--pressure",
        default="auto",
        metavar="auto|off|SOURCES",
        help="memory pressure sources: auto (default), off, or a comma list "
        "(see 'blkback pressure probe')",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=16,
        help="worker threads per connection for blocking backends (file, filters; default 16)",
    )
    parser.add_argument(
        "--max-connections", type=int, default=1024, help="connections accepted at once"
    )
    parser.add_argument(
        "--poll-us",
        type=int,
        default=0,
        metavar="MICROSECONDS",
        help="after serving requests, poll the connection this long before sleeping "
        "(like net.core.busy_read; 50 is its usual value): more IOPS at queue depth 1 for "
        "about that much CPU per request; only rings of in-memory or plain-file exports "
        "poll, and only while the server has at most half as many connections as CPUs; "
        "default 0 (never)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="drop a client that has not finished the handshake in time (default 10)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="drop a connection idle this long (default 0: never)",
    )
    parser.add_argument(
        "--io-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="drop a client that sends no byte of a write's payload, or takes none of its "
        "replies, for this long (default 60); a slow client that keeps moving is never cut",
    )
    parser.add_argument(
        "--max-block",
        default="32M",
        metavar="SIZE",
        help="largest request payload advertised and accepted (default 32M)",
    )
    parser.add_argument(
        "--tls",
        choices=("off", "allow", "require"),
        default="off",
        help="NBD_OPT_STARTTLS: off (default), allow (client's choice) or require",
    )
    parser.add_argument(
        "--tls-certificates",
        metavar="DIR",
        help="X.509 credentials directory: ca-cert.pem (optional), server-cert.pem, "
        "server-key.pem (nbdkit's layout)",
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="server certificate (chain)")
    parser.add_argument("--tls-key", metavar="PEM", help="server private key")
    parser.add_argument(
        "--tls-ca", metavar="PEM", help="CA that verifies client certificates when presented"
    )
    parser.add_argument(
        "--tls-verify-peer",
        action="store_true",
        help="require a client certificate signed by the CA",
    )
    parser.add_argument(
        "--mlock",
        action="store_true",
        help="pin pool pages in RAM, within RLIMIT_MEMLOCK (best effort)",
    )


def run(args: argparse.Namespace) -> int:
    """Start the server, print where it listens, serve until SIGINT/SIGTERM."""
    from blkback.server.exports import parse_export_arg
    from blkback.server.server import DEFAULT_TCP, Server, ServerConfig
    from blkback.storage.spec import open_storage, parse_size

    # Handlers first: a signal that arrives while we start still means "stop gracefully".
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    params = Params()
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE")
        params.set(name.strip(), value)
    for flag, value in (
        ("--workers", args.workers),
        ("--max-connections", args.max_connections),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1")
    if not 0 <= args.poll_us <= 1_000_000:
        raise ConfigError("--poll-us must be between 0 and 1000000")
    if not 0.1 <= args.io_timeout <= 86_400:
        raise ConfigError("--io-timeout must be between 0.1 and 86400 seconds")
    max_block = parse_size(args.max_block)
    if not 4096 <= max_block <= 1 << 30:
        raise ConfigError("--max-block must be between 4K and 1G")
    tls_context = None
    if args.tls != "off":
        from blkback.server.tls import TlsConfig, make_server_context

        tls_context = make_server_context(
            TlsConfig.from_options(
                directory=args.tls_certificates,
                cert=args.tls_cert,
                key=args.tls_key,
                ca=args.tls_ca,
                verify_peer=args.tls_verify_peer,
            )
        )
    elif args.tls_certificates or args.tls_cert or args.tls_key or args.tls_ca:
        log.warning("TLS credentials given but --tls is off: TLS is not offered")
    config = ServerConfig(
        listen=args.listen or [DEFAULT_TCP],
        control_path=args.control,
        metrics=args.metrics,
        workers=args.workers,
        max_connections=args.max_connections,
        poll_us=args.poll_us,
        handshake_timeout_s=args.handshake_timeout,
        idle_timeout_ns=int(args.idle_timeout * 1e9),
        io_timeout_ms=int(args.io_timeout * 1000),
        mlock=args.mlock,
        max_block=max_block,
        tls=args.tls,
        tls_context=tls_context,
    )
    exports = []
    try:
        for text in args.export or ["disk=memory:1G"]:
            name, spec = parse_export_arg(text)
            exports.append((name, spec, open_storage(spec)))
        server = Server(exports, params=params, config=config)
    except BaseException:
        for _, _, storage in exports:
            storage.close()
        raise
    server.start()
    if args.pressure != "off":
        _start_pressure(server, args.pressure)
    for uri in server.uris():
        print(uri)
    assert server.control is not None
    print(f"control: {server.control.path}")
    sys.stdout.flush()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        log.info("stopping: finishing in-flight requests")
        server.stop()
    return 0


def _start_pressure(server: Server, mode: str) -> None:
    """Listen to the kernel's memory pressure signals and report them to every device.

    This is the xenbus backend shrinker's role: the monitor's ``deliver`` walks the bus and
    calls each device's ``reclaim_memory``. Sources that do not work here are reported once
    (see ``blkback pressure probe``); with ``auto`` the server serves on regardless.
    """
    from blkback.pressure.monitor import PressureMonitor

    def deliver(level: PressureLevel, source: str) -> None:
        server.report_pressure(level, source)

    monitor = PressureMonitor(deliver, mode=mode, clock=server.clock)
    monitor.start()  # logs which sources are active and why the others are not
    server.monitor = monitor
