"""Serve block devices over NBD from per-connection page pools.

With no arguments: one 1 GiB in-memory export named ``disk`` on 127.0.0.1:10809
(``nbd://127.0.0.1/disk``), the default runtime parameters, and a control socket for
``blkback ctl``.

Export specs (``--export NAME=SPEC``): a backend, then options after commas.
  memory:SIZE              sparse RAM disk in the server's memory (pages on first write)
  memfd:SIZE               the same in a memfd (shmem; every access is a syscall)
  file:PATH[:SIZE]         a file (created sparse at SIZE if missing) or block device
  null:SIZE                writes discarded, reads zero: an emulated remote volume
Backend options:
  readonly, ro             refuse writes; also readonly=BOOL (yes/no, true/false, on/off, 1/0)
  direct=auto|BOOL         file: only: O_DIRECT; auto (default) uses it where the file
                           system allows it
Filters, stacked in the order given (each wraps what is left of it), like nbdkit's:
  delay=DUR                added latency of every read and write; DUR needs a unit:
                           10ms, 500us, 2s (only 0 may go without)
  delay-read=DUR           added latency of reads only (overrides delay= for reads)
  delay-write=DUR          added latency of writes only
  rate=SIZE[/s]            bandwidth limit in bytes per second (40M = 40 MiB/s)
  rate-burst=SIZE          bytes that may pass at once above the rate (default: 0.1 s of
                           rate, at least 64K)
  error=P                  fail a matching request with EIO with probability P (0 to 1)
  error-range=OFF-END      only requests touching bytes OFF to END (END excluded) fail
  error-ops=OP[,OP...]     only these operations fail: read, write, trim, zero, flush,
                           cache, extents, or all (default all)
  error-seed=N             seed (integer) of the error filter's draws (default 0)
SIZE is bytes, or a number with a binary suffix: K, M, G, T (1K = 1024 bytes).

Runtime parameters (``--param NAME=VALUE``, later ``blkback ctl set``):
  max_buffer_pages (1024), buffer_squeeze_duration_ms (10), lru_interval_ms (100),
  batch_free_pages (10), log_stats (0), squeeze_scope (device|global),
  squeeze_wake (1), squeeze_policy (kernel|graded).

nbdkit's conventions, with nbdkit's names:
  -U PATH, -p PORT [-i ADDR]   listen on a Unix socket / a TCP port (-U -: a private socket)
  -e NAME                      the default export's name
  -r                           every export read-only
  -f                           foreground: accepted; blkback never forks
  -P FILE                      write the server's PID to FILE once it listens
  --print-uri                  print the default export's URI (only it) on stdout
  -s, --single                 serve one client whose socket is stdin (inetd, systemd
                               Accept=yes, libnbd's nbd_connect_command), then exit
  --run CMD                    captive mode: run CMD under /bin/sh with $uri, $unixsocket,
                               $port, $tls, $exportname set, stop when it exits, exit with
                               its status (a private Unix socket unless you give listeners)
  --exit-with-parent           stop when the parent process exits (PR_SET_PDEATHSIG)
systemd: listening sockets passed with LISTEN_FDS/LISTEN_PID (socket activation) are served
instead of --listen; $MEMORY_PRESSURE_WATCH/$MEMORY_PRESSURE_WRITE (MemoryPressureWatch=)
are honoured by the pressure monitor. The control socket defaults to one derived from the
first listen address, so servers on different addresses never clash; it is printed at start.

Config file (--config FILE, TOML; flags override it, --listen/--export replace its lists):
  listen = [...], control, metrics, pressure = "auto" | [...]
  [limits] workers, max_connections, poll_us, handshake_timeout, idle_timeout, io_timeout
           (seconds), max_block, max_request, send_buffer (sizes), mlock
  [tls]    mode (off|allow|require), certificates | cert, key, ca; verify_peer
  [params] any runtime parameter
  [[export]] name, backend = "SPEC", filters = ["delay=2ms", ...] (appended), readonly

Exit status: 0 after a clean stop (SIGINT/SIGTERM, or --single's client left), the
command's own with --run, 1 when serving failed at run time (address in use...), 2 for a
usage error (bad flag, export spec, parameter, config file).

Examples:
  blkback serve
  blkback serve --listen unix:/run/nbd.sock --export vol=null:10G,rate=40M,delay=2ms
  blkback serve --export a=file:/var/lib/a.img:8G --export b=memory:512M,readonly
  blkback serve --run 'qemu-img info "$uri"'
  blkback serve --config /etc/blkback/blkback.toml
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from blkback.clock import NS_PER_S, NS_PER_US
from blkback.core.params import Params
from blkback.errors import ConfigError, RuntimeFailure
from blkback.server.config import ServeOptions, load_config, merge, seconds

if TYPE_CHECKING:
    from blkback.server.server import Server
    from blkback.server.settings import ServerConfig

log = logging.getLogger("blkback.serve")

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})  # a graceful stop


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``serve``'s options (defaults come from :class:`ServeOptions`, after --config)."""
    defaults = ServeOptions()
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with listeners, exports, parameters, TLS, limits and pressure "
        "sources (see the README); flags given here override it",
    )
    _add_listen_arguments(parser)
    _add_export_arguments(parser)
    _add_pool_arguments(parser)
    _add_limit_arguments(parser, defaults)
    _add_timeout_arguments(parser, defaults)
    _add_tls_arguments(parser)
    _add_control_arguments(parser)
    _add_mode_arguments(parser)


def _add_listen_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where to listen")
    group.add_argument(
        "--listen",
        action="append",
        metavar="unix:PATH|tcp:HOST:PORT",
        help="where to accept NBD clients (repeatable; default tcp:127.0.0.1:10809)",
    )
    group.add_argument(
        "-U",
        "--unix",
        metavar="PATH",
        help="listen on this Unix socket, as nbdkit -U ('-': a private one in a temp dir)",
    )
    group.add_argument(
        "-p", "--port", type=int, metavar="PORT", help="listen on this TCP port, as nbdkit -p"
    )
    group.add_argument(
        "-i",
        "--ipaddr",
        metavar="ADDR",
        help="the address for -p (default 127.0.0.1; nbdkit's default is every address)",
    )


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what to serve")
    group.add_argument(
        "--export",
        action="append",
        metavar="NAME=SPEC",
        help="an export (repeatable; default disk=memory:1G); the first is the default export",
    )
    group.add_argument(
        "-e",
        "--exportname",
        metavar="NAME",
        help="the default export: one of the --export names (it moves first), or the name "
        "of the default memory export when none is given, as nbdkit -e",
    )
    group.add_argument(
        "-r", "--readonly", action="store_true", default=None, help="every export read-only"
    )


def _add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pools and memory pressure")
    group.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a runtime parameter at start (repeatable)",
    )
    group.add_argument(
        "--pressure",
        metavar="auto|off|SOURCES",
        help="memory pressure sources: auto (default), off, or a comma list "
        "(see 'blkback pressure probe'); with $MEMORY_PRESSURE_WATCH set, auto is systemd's; "
        "after 1 s without any stall the PSI totals are not sampled while a source the "
        "kernel wakes us for (a PSI trigger, vmpressure) is armed, so an idle server sleeps",
    )
    group.add_argument(
        "--mlock",
        action="store_true",
        default=None,
        help="pin pool pages in RAM, within RLIMIT_MEMLOCK (best effort)",
    )


def _add_limit_arguments(parser: argparse.ArgumentParser, d: ServeOptions) -> None:
    group = parser.add_argument_group("connections and sizes")
    group.add_argument(
        "--workers",
        type=int,
        help=f"worker threads per connection for blocking backends (file, filters; "
        f"default {d.workers})",
    )
    group.add_argument(
        "--max-connections", type=int, help=f"connections accepted at once ({d.max_connections})"
    )
    group.add_argument(
        "--poll-us",
        type=int,
        metavar="MICROSECONDS",
        help="the longest busy-poll window: after serving requests a ring may poll its "
        "connection before sleeping, for a window that grows while requests come that soon "
        "after a reply and shrinks when they do not (KVM's halt-polling), and only while "
        "spinning costs it no more CPU per request than sleeping; more IOPS at queue depth "
        "1; only rings of in-memory or plain-file exports poll, and only while the server "
        f"has at most half as many connections as CPUs; 0: never; default {d.poll_us}",
    )
    group.add_argument(
        "--max-block",
        metavar="SIZE",
        help=f"largest request payload advertised (NBD_INFO_BLOCK_SIZE; default {d.max_block})",
    )
    group.add_argument(
        "--max-request",
        metavar="SIZE",
        help="largest READ/WRITE served, even if larger than advertised, as nbdkit serves "
        f"64M (default {d.max_request}); a connection's buffers may reach this times the "
        "requests in flight",
    )
    group.add_argument(
        "--send-buffer",
        metavar="SIZE",
        help="send buffer (SO_SNDBUF) of each Unix-socket connection: a 1 MiB read reply "
        "then leaves in one call instead of waiting five times for the client (the "
        "kernel's default is 208K; it doubles the value and caps it at net.core.wmem_max); "
        f"TCP keeps the kernel's autotuning; 0: the kernel's default; default {d.send_buffer}",
    )


def _add_timeout_arguments(parser: argparse.ArgumentParser, d: ServeOptions) -> None:
    group = parser.add_argument_group("timeouts")
    group.add_argument(
        "--handshake-timeout",
        type=seconds,
        metavar="DURATION",
        help="drop a client that has not finished the handshake in time "
        f"(e.g. 10s or 500ms; a bare number is seconds; default {d.handshake_timeout:g}s)",
    )
    group.add_argument(
        "--idle-timeout",
        type=seconds,
        metavar="DURATION",
        help="drop a connection idle this long (default 0: never)",
    )
    group.add_argument(
        "--io-timeout",
        type=seconds,
        metavar="DURATION",
        help="drop a client that sends no byte of a write's payload, or takes none of its "
        f"replies, for this long (default {d.io_timeout:g}s); a slow client that keeps "
        "moving is never cut",
    )


def _add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS")
    group.add_argument(
        "--tls",
        choices=("off", "allow", "require"),
        help="NBD_OPT_STARTTLS: off (default), allow (client's choice) or require",
    )
    group.add_argument(
        "--tls-certificates",
        metavar="DIR",
        help="X.509 credentials directory: ca-cert.pem (optional), server-cert.pem, "
        "server-key.pem (nbdkit's layout)",
    )
    group.add_argument("--tls-cert", metavar="PEM", help="server certificate (chain)")
    group.add_argument("--tls-key", metavar="PEM", help="server private key")
    group.add_argument(
        "--tls-ca", metavar="PEM", help="CA that verifies client certificates when presented"
    )
    group.add_argument(
        "--tls-verify-peer",
        action="store_true",
        default=None,
        help="require a client certificate signed by the CA",
    )


def _add_control_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("control and metrics")
    group.add_argument(
        "--control",
        metavar="PATH",
        help="control socket for 'blkback ctl' (default: derived from the first listen "
        "address, printed at start; none with --single unless given)",
    )
    group.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus /metrics")


def _add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("how to run (nbdkit's conventions)")
    group.add_argument(
        "-s",
        "--single",
        action="store_true",
        help="serve one client whose socket is stdin (inetd, systemd Accept=yes, "
        "nbd-tester-client -I), then exit; nothing is printed on stdout",
    )
    group.add_argument(
        "--run",
        metavar="CMD",
        help="captive mode: start, run CMD with /bin/sh and $uri, $unixsocket, $port, $tls, "
        "$exportname set, stop when it exits and exit with its status",
    )
    group.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when the parent process exits (Linux PR_SET_PDEATHSIG)",
    )
    group.add_argument(
        "--print-uri",
        action="store_true",
        help="print only the default export's URI on stdout (for scripts)",
    )
    group.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="accepted for nbdkit's sake: blkback always runs in the foreground",
    )
    group.add_argument(
        "-P", "--pidfile", metavar="FILE", help="write the PID to FILE once listening"
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM, the single client leaves, or the --run command exits."""
    # Handlers first: a signal that arrives while we start still means "stop gracefully".
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    if args.exit_with_parent:
        _exit_with_parent(stop)
    if args.single and args.run:
        raise ConfigError("--single and --run exclude each other")
    stdin_sock = _stdin_socket() if args.single else None
    options = resolve_options(args)
    with contextlib.ExitStack() as cleanup:
        with _stop_signals_to_this_thread():
            server = _start(args, options, cleanup)
            if stdin_sock is not None:
                # The client leaving stops the server as a signal does.
                server.serve_connected(stdin_sock, "stdin", on_close=stop.set)
        if stdin_sock is not None:
            stop.wait()  # no timeout, as below
            return 0
        # Captive and socket-activated servers share stdout with the program that started
        # them (nbdinfo -- [ blkback serve ] prints JSON there): they print nothing.
        quiet = bool(args.run) or bool(server.config.listen_fds)
        _announce(server, print_uri=args.print_uri, quiet=quiet)
        if args.run:
            return _run_captive(args.run, server, stop)
        # No timeout: the signal interrupts this wait (it is delivered to this thread) and
        # its handler sets ``stop``. A timed wait would wake the idle server every second.
        stop.wait()
        log.info("stopping: finishing in-flight requests")
    return 0


def _start(
    args: argparse.Namespace, options: ServeOptions, cleanup: contextlib.ExitStack
) -> Server:
    """Decide the listeners and control socket of this way of running, then build and
    start the server, its pressure monitor and pidfile; ``cleanup`` undoes all of it."""
    private = PrivateDir(cleanup)
    activated = [] if args.single else _listen_fds()
    if args.single and args.control is None:
        # One process per connection: a control socket from the config file would be
        # shared by all of them; only an explicit --control gives one.
        options.control = None
    if activated and options.listen:
        log.info("socket activation: serving the %d inherited sockets", len(activated))
    if args.single or activated:
        options.listen = []
    elif not options.listen:
        options.listen = _default_listen(args, private)
    if args.run and options.control is None and not os.environ.get("BLKBACK_CONTROL"):
        options.control = str(private() / "control.sock")
    server = build_server(options, listen_fds=activated, single=args.single)
    server.start()
    cleanup.callback(server.stop)
    if options.pressure != "off":
        server.start_pressure_monitor(options.pressure)  # logs which sources work and why not
    if args.pidfile:
        _write_pidfile(args.pidfile, cleanup)
    return server


def resolve_options(args: argparse.Namespace) -> ServeOptions:
    """Defaults, then ``--config FILE``, then the flags given."""
    file_values = load_config(args.config) if args.config else {}
    flags: dict[str, Any] = {
        name: getattr(args, name)
        for name in (
            "control", "metrics", "pressure", "workers", "max_connections", "poll_us",
            "handshake_timeout", "idle_timeout", "io_timeout", "max_block", "max_request",
            "send_buffer", "mlock", "tls", "tls_certificates", "tls_cert", "tls_key", "tls_ca",
            "tls_verify_peer",
        )
    }  # fmt: skip
    listen = list(args.listen or [])
    if args.unix is not None and args.unix != "-":
        listen.append(f"unix:{args.unix}")
    if args.port is not None or args.ipaddr is not None:
        listen.append(
            f"tcp:{args.ipaddr or '127.0.0.1'}:{10809 if args.port is None else args.port}"
        )
    flags["listen"] = listen or None
    flags["exports"] = args.export
    params: dict[str, str] = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE")
        params[name.strip()] = value
    flags["params"] = params
    options = merge(file_values, flags)
    if not options.exports:
        options.exports = [f"{args.exportname or 'disk'}=memory:1G"]
    elif args.exportname:
        _make_default(options, args.exportname)
    if args.readonly:
        options.exports = [f"{e},readonly" for e in options.exports]
    return options


def _make_default(options: ServeOptions, name: str) -> None:
    """Move export ``name`` first: the first export is the default one (``-e``)."""
    chosen = [e for e in options.exports if e.partition("=")[0] == name]
    if not chosen:
        names = ", ".join(e.partition("=")[0] for e in options.exports)
        raise ConfigError(f"-e {name!r}: no such export (exports: {names})")
    options.exports = chosen + [e for e in options.exports if e not in chosen]


def build_server(options: ServeOptions, *, listen_fds: list[int], single: bool) -> Server:
    """Check ``options``, open the exports and build (not start) the server."""
    from blkback.server.exports import parse_export_arg
    from blkback.server.server import Server
    from blkback.storage.spec import open_storage

    params = Params()
    for name, value in options.params.items():
        try:
            params.set(name, value)
        except ConfigError as exc:
            where = options.origins.get(f"param:{name}")
            raise type(exc)(f"{where}: {exc}" if where else str(exc)) from None
    config = server_config(options, listen_fds=listen_fds, single=single)
    exports = []
    try:
        for text in options.exports:
            try:
                name, spec = parse_export_arg(text)
                exports.append((name, spec, open_storage(spec)))
            except ConfigError as exc:
                where = options.origins.get("exports")  # set when the config file gave them
                if where is None:
                    raise
                raise type(exc)(f"{where} {text.partition('=')[0]!r}: {exc}") from None
        return Server(exports, params=params, config=config)
    except BaseException:
        for _, _, storage in exports:
            storage.close()
        raise


# The size options of ServeOptions: least and most bytes, and those bounds as an error says them.
_SIZE_BOUNDS: dict[str, tuple[int, int, str]] = {
    "max_block": (4096, 1 << 30, "between 4K and 1G"),
    "max_request": (4096, 1 << 30, "between 4K and 1G"),
    "send_buffer": (0, 64 << 20, "at most 64M"),
}


def server_config(options: ServeOptions, *, listen_fds: list[int], single: bool) -> ServerConfig:
    """The :class:`ServerConfig` of checked ``options``; errors name the flag or key."""
    from blkback.server.settings import ServerConfig
    from blkback.storage.spec import parse_size

    w = options.where
    for name in ("workers", "max_connections"):
        if getattr(options, name) < 1:
            raise ConfigError(f"{w(name)} must be at least 1")
    if not 0 <= options.poll_us <= 1_000_000:
        raise ConfigError(f"{w('poll_us')} must be between 0 and 1000000")
    if not 0.1 <= options.io_timeout <= 86_400:
        raise ConfigError(f"{w('io_timeout')} must be between 0.1 and 86400 seconds")
    sizes = {}
    for name, (least, most, bounds) in _SIZE_BOUNDS.items():
        try:
            sizes[name] = parse_size(getattr(options, name))
        except ConfigError as exc:
            raise ConfigError(f"{w(name)}: {exc}") from None
        if not least <= sizes[name] <= most:
            raise ConfigError(f"{w(name)} must be {bounds}")
    tls_context = None
    if options.tls != "off":
        from blkback.server.tls import TlsConfig, make_server_context

        tls_context = make_server_context(
            TlsConfig.from_options(
                directory=options.tls_certificates,
                cert=options.tls_cert,
                key=options.tls_key,
                ca=options.tls_ca,
                verify_peer=options.tls_verify_peer,
            )
        )
    elif options.tls_certificates or options.tls_cert or options.tls_key or options.tls_ca:
        log.warning("TLS credentials given but --tls is off: TLS is not offered")
    return ServerConfig(
        listen=list(options.listen),
        listen_fds=listen_fds,
        control_path=options.control,
        control_socket=not single or options.control is not None,
        metrics=options.metrics,
        workers=options.workers,
        max_connections=options.max_connections,
        poll_ns=options.poll_us * NS_PER_US,
        handshake_timeout_ns=round(options.handshake_timeout * NS_PER_S),
        idle_timeout_ns=round(options.idle_timeout * NS_PER_S),
        io_timeout_ns=round(options.io_timeout * NS_PER_S),
        mlock=options.mlock,
        max_block=sizes["max_block"],
        max_request=sizes["max_request"],
        send_buffer=sizes["send_buffer"],
        tls=options.tls,  # type: ignore[arg-type]  # checked by argparse or the config loader
        tls_context=tls_context,
    )


# -- nbdkit's conventions ----------------------------------------------------------------
def _stdin_socket() -> socket.socket:
    """The client socket of ``--single``: stdin, which inetd and systemd hand over.

    stdout and stderr may be the same socket (inetd ``nowait`` dups it onto 0, 1 and 2):
    then they are pointed at /dev/null, so that no stray byte of output (a log line, a
    print) can corrupt the protocol.
    """
    st = os.fstat(0)
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(
            "--single serves the socket on stdin (inetd, systemd Accept=yes, libnbd's "
            "nbd_connect_command); stdin is not a socket"
        )
    sock = socket.socket(fileno=os.dup(0))
    if sock.type != socket.SOCK_STREAM:
        raise ConfigError("--single: stdin is not a stream socket")
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            other = os.fstat(fd)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                os.dup2(devnull, fd)
    os.close(devnull)
    sys.stdout = sys.stderr  # anything printed goes to the log, never to the client
    return sock


def _listen_fds() -> list[int]:
    """Listening sockets passed by systemd (``sd_listen_fds``): fds 3.. when
    ``$LISTEN_PID`` is us. The variables are removed so that children do not take them."""
    pid = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    fds = list(range(3, 3 + int(count)))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def _default_listen(args: argparse.Namespace, private: PrivateDir) -> list[str]:
    """``-U -`` or ``--run`` without listeners: a private Unix socket; else the TCP default."""
    from blkback.server.settings import DEFAULT_TCP

    if args.unix == "-" or args.run:
        return [f"unix:{private() / 'nbd.sock'}"]
    return [DEFAULT_TCP]


class PrivateDir:
    """A temporary directory for private sockets (``-U -``, ``--run``): made on first use,
    removed when ``cleanup`` closes."""

    def __init__(self, cleanup: contextlib.ExitStack) -> None:
        self._cleanup = cleanup
        self._path: Path | None = None

    def __call__(self) -> Path:
        if self._path is None:
            self._path = Path(tempfile.mkdtemp(prefix="blkback-"))
            self._cleanup.callback(shutil.rmtree, self._path, ignore_errors=True)
        return self._path


@contextlib.contextmanager
def _stop_signals_to_this_thread() -> Iterator[None]:
    """Block SIGINT and SIGTERM while the server starts its threads, which keep the mask.

    The kernel gives a process's signal to any thread that does not block it, and Python
    runs the handler in the main thread only when it next runs: a signal taken by a ring or
    accept thread would leave the main thread asleep in its wait. With every other thread
    blocking them, the signals come to this one and interrupt its wait. One that arrives
    meanwhile waits until the ``with`` ends, then stops the server as usual.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _exit_with_parent(stop: threading.Event) -> None:
    """Ask Linux for SIGTERM when the parent dies (``prctl(PR_SET_PDEATHSIG)``)."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise RuntimeFailure(f"--exit-with-parent: prctl failed: {os.strerror(err)}")
    if os.getppid() != parent:  # it died before the prctl took effect
        stop.set()


def _write_pidfile(path: str, cleanup: contextlib.ExitStack) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)  # whoever waits for the file never reads it half-written
    cleanup.callback(_remove, path)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _announce(server: Server, *, print_uri: bool, quiet: bool) -> None:
    """stdout: every URI and the control socket; with --print-uri only the default URI."""
    uris = server.uris()
    if print_uri:
        print(uris[0] if uris else "")
    elif not quiet:
        for uri in uris:
            print(uri)
        if server.control is not None:
            print(f"control: {server.control.path}")
    sys.stdout.flush()
    for uri in uris:
        log.info("serving %s", uri)
    if server.control is not None:
        log.info("control socket: %s", server.control.path)


def captive_env(server: Server) -> dict[str, str]:
    """The environment of ``--run``'s command, with nbdkit's variable names."""
    env = dict(os.environ)
    uris = server.uris()
    unix = next((a[5:] for a in server.addresses if a.startswith("unix:")), "")
    tcp = next((a for a in server.addresses if a.startswith("tcp:")), "")
    env.update(
        uri=uris[0] if uris else "",
        unixsocket=unix,
        port=tcp.rpartition(":")[2] if tcp else "",
        tls={"off": "0", "allow": "1", "require": "2"}[server.config.tls],
        exportname=server.catalog.names()[0],
    )
    if server.control is not None:
        env["BLKBACK_CONTROL"] = server.control.path
    return env


def _run_captive(command: str, server: Server, stop: threading.Event) -> int:
    """Run ``command``; a stop signal to us is passed on to it as SIGTERM. Its exit status
    is returned (128 + N when a signal N ended it, as a shell reports it)."""
    proc = subprocess.Popen(["/bin/sh", "-c", command], env=captive_env(server))
    with _reaped(proc), _stop_signals_passed_to(proc):
        if stop.is_set():  # a signal (or --exit-with-parent) came while we started
            proc.send_signal(signal.SIGTERM)
        # No timeout: a signal runs its handler in this thread, and the wait goes on
        # until the command exits.
        code = proc.wait()
    return 128 - code if code < 0 else code


@contextlib.contextmanager
def _stop_signals_passed_to(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """While the captive command runs, SIGINT/SIGTERM to us send it SIGTERM."""

    def pass_on(signum: int, frame: FrameType | None) -> None:
        proc.send_signal(signal.SIGTERM)

    previous = {signum: signal.signal(signum, pass_on) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
