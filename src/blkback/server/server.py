"""The server: listeners, one thread per connection, the bus of devices, the control socket.

Locking: ``bus_lock`` serialises everything that changes which rings exist (attach, detach)
with pressure reports walking the bus, as the 5.6 kernel's ``reclaim_sem`` serialises the
backend shrinker with probe and remove. Each ring's pool is touched only under its
connection's ``ring_lock``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import ipaddress
import json
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from librt.threading import Lock

from blkback.clock import NS_PER_MS, NS_PER_S, Clock, MonotonicClock
from blkback.core.device import Bus
from blkback.core.params import Params
from blkback.core.policy import PressureLevel
from blkback.core.ring import Ring
from blkback.errors import ConfigError, RuntimeFailure
from blkback.pressure.monitor import PressureMonitor
from blkback.protocol.handshake import ExportInfo
from blkback.server import oplog
from blkback.server.connection import Connection
from blkback.server.exports import Catalog, Export, tflags_for
from blkback.server.settings import ServerConfig
from blkback.storage.base import Storage

if TYPE_CHECKING:
    from blkback.server.metrics import MetricsEndpoint

log = logging.getLogger("blkback.server")


def control_dir() -> Path:
    """The directory of default control sockets: ``$BLKBACK_CONTROL_DIR`` if set, else
    ``/run/blkback`` for root, else per user."""
    env = os.environ.get("BLKBACK_CONTROL_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/blkback")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "blkback" if runtime else Path(f"/tmp/blkback-{os.geteuid()}")


def default_control_path(address: str | None = None) -> str:
    """The control socket of a server whose first listener is ``address``.

    Derived from the address so that two servers on different addresses never clash:
    ``tcp:127.0.0.1:10809`` gets ``control-tcp-127.0.0.1-10809.sock``, a Unix socket a
    short hash of its path (socket paths are limited to 107 bytes). ``$BLKBACK_CONTROL``
    overrides it; ``None`` (no listener: ``--single``) gives ``control.sock``.
    """
    env = os.environ.get("BLKBACK_CONTROL")
    if env:
        return env
    if address is None:
        return str(control_dir() / "control.sock")
    kind, _, rest = address.partition(":")
    if kind == "unix":
        slug = "unix-" + hashlib.sha256(rest.encode()).hexdigest()[:12]
    else:
        slug = "tcp-" + rest.replace("[", "").replace("]", "").replace(":", "-")
    return str(control_dir() / f"control-{slug}.sock")


def find_control_path() -> str:
    """The control socket ``blkback ctl`` talks to when no ``--control`` is given.

    ``$BLKBACK_CONTROL`` if set; else the one live control socket in :func:`control_dir`.

    Raises:
        RuntimeFailure: No server runs (no live control socket there).
        ConfigError: Several servers run: the user must say which with ``--control``.
    """
    env = os.environ.get("BLKBACK_CONTROL")
    if env:
        return env
    base = control_dir()
    candidates = sorted(base.glob("control*.sock")) if base.is_dir() else []
    live = [str(p) for p in candidates if _socket_is_live(str(p))]
    if not live:
        raise RuntimeFailure(
            f"no server listens: no control socket in {base} "
            "(start one with 'blkback serve', or give --control PATH)"
        )
    if len(live) > 1:
        raise ConfigError(
            "several servers run; say which with --control PATH (one of: " + ", ".join(live) + ")"
        )
    return live[0]


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def parse_listen(text: str) -> tuple[str, Any]:
    """``unix:PATH`` or ``tcp:HOST:PORT`` (``[v6]:port`` too) to (family, address)."""
    kind, sep, rest = text.partition(":")
    if sep and kind == "unix":
        if not rest:
            raise ConfigError(f"--listen {text!r}: the Unix socket path is empty")
        return "unix", rest
    if sep and kind == "tcp":
        host, sep2, port_text = rest.rpartition(":")
        if not sep2 or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ConfigError(f"--listen {text!r}: expected tcp:HOST:PORT with a port 0-65535")
        host = host.strip("[]") or "127.0.0.1"
        return "tcp", (host, int(port_text))
    raise ConfigError(f"--listen {text!r}: expected unix:PATH or tcp:HOST:PORT")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unlink_stale_socket(path: str, what: str, hint: str = "") -> None:
    """Remove a Unix socket left by a dead server; refuse to steal a live one or a file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{what} {path!r} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise RuntimeFailure(f"{what} {path!r} is in use by a running server{hint}")


class Server:
    """A running blkback server."""

    def __init__(
        self,
        exports: list[tuple[str, str, Storage]],
        *,
        params: Params | None = None,
        config: ServerConfig | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not exports:
            raise ConfigError("no export to serve")
        self.config = config or ServerConfig()
        self.params = params or Params()
        self.clock: Clock = clock or MonotonicClock()
        self.bus = Bus(self.params)
        self.bus.stats_sink = lambda line: log.info("stats %s", line)  # pr_info, as the kernel
        self.bus_lock = threading.Lock()
        pollers = self.config.max_pollers or max(1, (os.cpu_count() or 2) // 2)
        #: One lock per polling slot: a ring polls only while it holds one (non-blocking
        #: acquire), so a busy host of many rings does not spin more threads than cores.
        #: mypyc's runtime lock: the compiled ring's acquire is a direct C call.
        self.poll_slots = [Lock() for _ in range(pollers)]
        self.catalog = Catalog()
        for name, spec, storage in exports:
            if name in self.catalog.exports:
                raise ConfigError(f"export {name!r} is defined twice")
            info = ExportInfo(
                name=name,
                size=storage.size,
                tflags=tflags_for(storage),
                max_block=self.config.max_block,
                max_request=max(self.config.max_block, self.config.max_request),
                description=spec,
            )
            device = self.bus.add_device(name)
            self.catalog.add(Export(name, storage, device, info, spec))
        self.connections: set[Connection] = set()
        self._close_hooks: dict[Connection, Callable[[], object]] = {}
        self.conn_lock = threading.Lock()
        self._stop_event = threading.Event()
        self.started_ns = self.clock.now_ns()
        self.listeners: list[socket.socket] = []
        self.addresses: list[str] = []
        self._unix_paths: list[str] = []
        self._threads: list[threading.Thread] = []
        self._warned: set[str] = set()
        self.control: ControlServer | None = None
        self.metrics: MetricsEndpoint | None = None
        #: The kernel's pressure signals, when :meth:`start_pressure_monitor` started them.
        self.monitor: PressureMonitor | None = None
        self.pressure_events: dict[str, int] = {}
        self.squeeze_latency_ns: collections.deque[int] = collections.deque(maxlen=10_000)
        self.connections_total = 0
        self.connections_refused = 0
        self.params.subscribe(self._param_changed)

    def _param_changed(self, name: str, old: object, new: object) -> None:
        """Wake every resting ring: its pass may have something to do now."""
        with self.conn_lock:
            conns = list(self.connections)
        for conn in conns:
            conn.nudge()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` has begun."""
        return self._stop_event.is_set()

    # -- start and stop -------------------------------------------------------------------
    def start(self) -> None:
        """Bind every listener and the control socket, and start accepting."""
        try:
            for fd in self.config.listen_fds:
                self._adopt_listener(fd)
            for text in self.config.listen:
                self._listen(text)
            if self.config.control_socket:
                path = self.config.control_path or default_control_path(
                    self.addresses[0] if self.addresses else None
                )
                self.control = ControlServer(self, path)
            if self.config.metrics:
                from blkback.server.metrics import start_metrics

                self.metrics = start_metrics(self, self.config.metrics)
        except BaseException:
            self.stop()
            raise
        oplog.started(self.addresses, self.catalog.exports.values(), self.params.log_stats)
        self.params.subscribe(oplog.param_changed)
        for lsock in self.listeners:
            t = threading.Thread(target=self._accept_loop, args=(lsock,), daemon=True)
            t.start()
            self._threads.append(t)

    def _listen(self, text: str) -> None:
        kind, addr = parse_listen(text)
        if kind == "unix":
            _unlink_stale_socket(addr, "listen socket")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(addr)
            except OSError as exc:
                sock.close()
                raise RuntimeFailure(f"cannot listen on {addr}: {exc.strerror}") from exc
            self._unix_paths.append(addr)
            self.addresses.append(f"unix:{addr}")
        else:
            host, port = addr
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                sock.close()
                why = "address in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise RuntimeFailure(f"cannot listen on {host}:{port}: {why}") from exc
            real_port = sock.getsockname()[1]
            shown = f"[{host}]" if family == socket.AF_INET6 else host
            self.addresses.append(f"tcp:{shown}:{real_port}")
            if not _is_loopback(host):
                log.warning(
                    "listening on non-loopback address %s:%d as asked: anyone who can reach "
                    "it can read and write the exports",
                    host,
                    real_port,
                )
        # A backlog as deep as the connections allowed (the kernel caps it at somaxconn):
        # clients that connect at once (fio, nbdcopy -C) get EAGAIN on a full Unix backlog.
        sock.listen(max(128, self.config.max_connections))
        self.listeners.append(sock)

    def _adopt_listener(self, fd: int) -> None:
        """Serve a listening socket handed over by the service manager (systemd's
        ``LISTEN_FDS``), already bound: its address is what ``getsockname`` says."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise RuntimeFailure(f"inherited fd {fd} is not a socket: {exc.strerror}") from exc
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            sock.detach()
            raise ConfigError(
                f"inherited fd {fd} is not a listening stream socket: use ListenStream= "
                "with Accept=no, or serve --single for Accept=yes"
            )
        if sock.family == socket.AF_UNIX:
            self.addresses.append(f"unix:{sock.getsockname()}")
        else:
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
            self.addresses.append(f"tcp:{shown}:{port}")
        self.listeners.append(sock)

    def serve_connected(
        self, sock: socket.socket, peer: str, on_close: Callable[[], object] | None = None
    ) -> Connection:
        """Serve one already connected socket (``serve --single``: inetd's hand-over).

        ``on_close`` is called on the connection's thread once it has closed: the caller
        waits for that, not in timed steps.
        """
        self._tune_socket(sock)
        conn = Connection(self, sock, peer)
        with self.conn_lock:
            self.connections.add(conn)
            self.connections_total += 1
            if on_close is not None:
                self._close_hooks[conn] = on_close
        conn.start()
        return conn

    def uris(self) -> list[str]:
        """NBD URIs of every export on every listener (``nbds`` when TLS is required)."""
        tls = "s" if self.config.tls == "require" else ""
        out = []
        for addr in self.addresses:
            kind, _, rest = addr.partition(":")
            for name in self.catalog.names():
                if kind == "unix":
                    out.append(f"nbd{tls}+unix:///{name}?socket={rest}")
                else:
                    host, _, port = rest.rpartition(":")
                    port_part = "" if port == "10809" else f":{port}"
                    out.append(f"nbd{tls}://{host}{port_part}/{name}")
        return out

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, finish in-flight requests, flush storage, close everything."""
        if self.stopping:
            return
        self._stop_event.set()
        for lsock in self.listeners:
            with contextlib.suppress(OSError):
                lsock.shutdown(socket.SHUT_RDWR)
            lsock.close()
        with self.conn_lock:
            conns = list(self.connections)
        for conn in conns:
            conn.stop_reading()
        clock = self.clock
        deadline_ns = clock.now_ns() + round(timeout_s * NS_PER_S)
        for conn in conns:
            if not clock.wait_until(deadline_ns, conn.closed):
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
                clock.wait_until(clock.now_ns() + NS_PER_S, conn.closed)
        if self.monitor is not None:
            self.monitor.stop()
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.stop()
        for export in self.catalog.exports.values():
            with contextlib.suppress(Exception):
                if export.storage.can_flush:
                    export.storage.flush()
            export.storage.close()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)

    # -- connections ----------------------------------------------------------------------
    def _tune_socket(self, sock: socket.socket) -> None:
        """A client's socket options: no Nagle delay on TCP; on Unix, the send buffer.

        A Unix socket's replies queue against the sender's buffer alone, so its size decides
        how much of a large read reply leaves in one call (``ServerConfig.send_buffer``). TCP
        keeps the kernel's autotuned buffer, which setting ``SO_SNDBUF`` would switch off.
        """
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif self.config.send_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.send_buffer)

    def _accept_loop(self, lsock: socket.socket) -> None:
        stop = self._stop_event.is_set
        while not stop():
            try:
                sock, addr = lsock.accept()
            except OSError:
                if stop():
                    return
                continue
            if stop():
                sock.close()
                return
            self._tune_socket(sock)
            if sock.family != socket.AF_UNIX:
                peer = f"{addr[0]}:{addr[1]}"
            else:
                peer = f"unix#{self.connections_total}"
            with self.conn_lock:
                if len(self.connections) >= self.config.max_connections:
                    self.connections_refused += 1
                    log.warning("refusing %s: %d connections already", peer, len(self.connections))
                    sock.close()
                    continue
                conn = Connection(self, sock, peer)
                self.connections.add(conn)
                self.connections_total += 1
            try:
                conn.start()
            except RuntimeError as exc:  # "can't start new thread": out of memory or threads
                log.warning("refusing %s: %s", peer, exc)
                with self.conn_lock:
                    self.connections.discard(conn)
                    self.connections_refused += 1
                sock.close()

    def connection_closed(self, conn: Connection) -> None:
        """Called by a connection's thread when it is done."""
        with self.conn_lock:
            self.connections.discard(conn)
            hook = self._close_hooks.pop(conn, None)
        if hook is not None:
            hook()

    def attach_ring(self, conn: Connection, export: Export) -> Ring:
        """Create the connection's ring on the export's device."""
        assert conn.allocator is not None
        with self.bus_lock:
            return export.device.add_ring(conn.allocator, self.clock.now_ns())

    def detach_ring(self, conn: Connection) -> None:
        """Free the ring's pool and remove it (``xen_blkbk_free_caches`` on disconnect)."""
        ring = conn.ring
        export = conn.export
        assert ring is not None
        assert export is not None
        with self.bus_lock, conn.ring_lock:
            ring.waker = None
            export.device.remove_ring(ring)

    def warn_once(self, message: str) -> None:
        """Log a warning the first time it is seen."""
        if message.split(":")[0] not in self._warned:
            self._warned.add(message.split(":")[0])
            log.warning("%s", message)

    # -- pressure -------------------------------------------------------------------------
    def start_pressure_monitor(self, mode: str) -> PressureMonitor:
        """Listen to the kernel's memory pressure signals (``serve --pressure MODE``).

        This is the xenbus backend shrinker's role: the monitor fuses and coalesces the
        signals and calls :meth:`report_pressure`, which walks the bus and calls each
        device's ``reclaim_memory``. Sources that do not work here are logged once (see
        ``blkback pressure probe``); with ``auto`` the server serves on regardless.

        Quiet PSI totals park (see :class:`~blkback.pressure.sources.Poller`): an idle server
        then sleeps until the kernel reports pressure. Each wake-up of the monitor cost a
        server with 64 idle connections ~4.9 ms of CPU here, 1.6-1.7 % of a core at 4 a
        second (docs/data-path.md section 2).
        """
        monitor = PressureMonitor(
            self.report_pressure, mode=mode, clock=self.clock, park_quiet_sampling=True
        )
        monitor.start()
        self.monitor = monitor
        return monitor

    def report_pressure_by_hand(self, level: PressureLevel) -> None:
        """``ctl pressure``: through the monitor when one runs (counted and coalesced like
        the kernel's reports), else straight to :meth:`report_pressure`."""
        if self.monitor is not None:
            self.monitor.report(level, "manual")
        else:
            self.report_pressure(level, "manual")

    def report_pressure(self, level: PressureLevel, source: str = "manual") -> int:
        """A pressure report (the backend shrinker's count): tell every device.

        With ``squeeze_wake`` on, every ring's pass runs inside this call, so its duration is
        the time from the report to every pool being at its squeezed target; it is recorded.
        """
        key = f"{source}:{level.name.lower()}"
        with self.bus_lock:
            self.pressure_events[key] = self.pressure_events.get(key, 0) + 1
            before = oplog.squeeze_counts(self.bus)
            t0 = self.clock.now_ns()
            n = self.bus.reclaim_memory(t0, level)
            if self.params.squeeze_wake:
                self.squeeze_latency_ns.append(self.clock.now_ns() - t0)
            after = oplog.squeeze_counts(self.bus)
        oplog.squeezed(before, after, level, source, wake=bool(self.params.squeeze_wake))
        return n

    # -- stats ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Everything ``ctl stats --json`` shows."""
        now = self.clock.now_ns()
        with self.bus_lock:
            devices = [d.snapshot(now) for d in self.bus.devices.values()]
            retired = dict(self.bus.retired)
        rss = _rss_bytes()
        out: dict[str, Any] = {
            "params": self.params.as_dict(),
            "now_ms": now / NS_PER_MS,
            "devices": devices,
            "server": {
                "pid": os.getpid(),
                "uptime_s": (now - self.started_ns) / NS_PER_S,
                "connections": len(self.connections),
                "connections_total": self.connections_total,
                "connections_refused": self.connections_refused,
                "rss_bytes": rss,
                "retired_rings": retired,
                "listen": self.addresses,
            },
            "pressure": {
                "reports": self.bus.reports,
                "events": dict(self.pressure_events),
                "squeeze_latency_ms": _summary_ms(list(self.squeeze_latency_ns)),
                "monitor": None if self.monitor is None else self.monitor.status(),
            },
        }
        return out


def _summary_ms(values_ns: list[int]) -> dict[str, float | int]:
    """Count, median, p99 and max of durations, in milliseconds."""
    if not values_ns:
        return {"count": 0}
    v = sorted(values_ns)

    def q(f: float) -> float:
        return v[min(len(v) - 1, int(f * len(v)))] / NS_PER_MS

    return {"count": len(v), "p50": q(0.5), "p99": q(0.99), "max": v[-1] / NS_PER_MS}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class ControlServer:
    """The control socket: one JSON request per line, one JSON answer per line.

    The socket is created mode 0600 and each peer's credentials are checked
    (``SO_PEERCRED``): only root and the server's own user may read statistics, change
    parameters or trigger squeezes.
    """

    def __init__(self, server: Server, path: str) -> None:
        self.server = server
        self.path = path
        parent = Path(path).parent
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _unlink_stale_socket(
            path, "control socket", ": give this server its own with --control PATH"
        )
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        except OSError as exc:
            self.sock.close()
            raise RuntimeFailure(
                f"cannot create control socket {path}: {exc.strerror} (choose another with "
                "--control PATH)"
            ) from exc
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="control", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop answering and remove the socket."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _loop(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
            except RuntimeError:  # out of memory for a thread: drop this request, go on
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid not in (0, os.geteuid()):
                conn.sendall(b'{"ok": false, "error": "permission denied"}\n')
                return
            conn.settimeout(30)
            f = conn.makefile("rwb")
            for line in f:
                try:
                    request = json.loads(line)
                    answer = {"ok": True, **self.handle(request)}
                except (ConfigError, ValueError, KeyError, TypeError) as exc:
                    answer = {"ok": False, "error": str(exc)}
                f.write(json.dumps(answer).encode() + b"\n")
                f.flush()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one control request."""
        server = self.server
        op = request.get("op")
        if op == "params":
            return {"params": server.params.as_dict()}
        if op == "get":
            name = request["name"]
            return {"name": name, "value": server.params.get(name)}
        if op == "set":
            name = request["name"]
            old = server.params.get(name)
            # The time just before the value takes effect: no pass can see it earlier.
            now_ms = server.clock.now_ns() / NS_PER_MS
            value = server.params.set(name, request["value"])
            log.info("parameter %s: %r -> %r", name, old, value)
            return {"name": name, "old": old, "value": value, "now_ms": now_ms}
        if op == "stats":
            return server.stats()
        if op == "pressure":
            level = PressureLevel.parse(request.get("level", "critical"))
            server.report_pressure_by_hand(level)
            return {"level": level.name.lower(), "devices": len(server.bus.devices)}
        if op == "pressure-status":
            mon = server.monitor
            return {"monitor": None if mon is None else mon.status()}
        raise ValueError(f"unknown control operation {op!r}")
