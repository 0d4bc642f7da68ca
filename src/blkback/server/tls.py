"""TLS for NBD connections: X.509 credentials and the TLS connection's own I/O path.

``NBD_OPT_STARTTLS`` upgrades a connection in the middle of option haggling: the sans-IO
handshake answers the option with an ACK and stops in ``START_TLS``; the connection then
calls :func:`start_tls`, which runs the TLS handshake on the raw socket and returns a
:class:`TlsSocket` that the connection uses from then on in place of the socket.

Credentials follow nbdkit's ``--tls-certificates DIR`` layout (``ca-cert.pem``,
``server-cert.pem``, ``server-key.pem``) or come from explicit files. With a CA, a client
certificate is verified against it when one is presented, and required with
``verify_peer``. TLS 1.2 is the minimum, as the spec asks ("TLS versions").

Why a separate I/O path: :class:`ssl.SSLSocket` has no ``sendmsg``/``recvmsg_into``, and
OpenSSL does not allow one ``SSL`` object to be read and written by two threads at once,
which the connection does (the ring thread receives while worker threads reply). So
:class:`TlsSocket` keeps the underlying socket non-blocking, does every OpenSSL call under
one lock, and waits for readiness with ``poll`` *outside* the lock. It presents the subset of
the socket API the connection uses with the same semantics as a plain blocking socket with
``SO_RCVTIMEO``/``SO_SNDTIMEO``: a receive wait that expires raises ``BlockingIOError``
(``TimeoutError`` when a Python-level timeout was set with :meth:`TlsSocket.settimeout`), so
the connection's loop is the same code for both, and the plaintext hot path never pays for
TLS.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blkback.clock import NS_PER_MS, NS_PER_S, MonotonicClock
from blkback.errors import ConfigError

__all__ = ["TlsConfig", "TlsSocket", "make_server_context", "start_tls"]

_TIMEVAL = struct.Struct("ll")
_CLOCK = MonotonicClock()  # socket timeouts are real time
#: How long closing a TLS connection may wait to send its close_notify alert.
CLOSE_NOTIFY_NS = 1_000_000_000


@dataclass(frozen=True)
class TlsConfig:
    """Where the server's credentials are.

    Attributes:
        cert: PEM server certificate (chain).
        key: PEM private key of the certificate.
        ca: PEM CA bundle that client certificates are verified against, or None (no client
            certificates are asked for).
        verify_peer: Require a client certificate signed by ``ca``.
    """

    cert: str
    key: str
    ca: str | None = None
    verify_peer: bool = False

    @classmethod
    def from_options(
        cls,
        *,
        directory: str | None,
        cert: str | None,
        key: str | None,
        ca: str | None,
        verify_peer: bool,
    ) -> TlsConfig:
        """Combine ``--tls-certificates DIR`` with explicit ``--tls-cert/-key/-ca``.

        Explicit files win over the directory's. A ``ca-cert.pem`` in the directory is used
        when present.

        Raises:
            ConfigError: A certificate or key is missing, or ``verify_peer`` without a CA.
        """
        base = Path(directory) if directory else None
        if base is not None and not base.is_dir():
            raise ConfigError(f"--tls-certificates {directory}: not a directory")
        cert = cert or (str(base / "server-cert.pem") if base else None)
        key = key or (str(base / "server-key.pem") if base else None)
        if ca is None and base is not None and (base / "ca-cert.pem").exists():
            ca = str(base / "ca-cert.pem")
        if cert is None or key is None:
            raise ConfigError(
                "TLS needs a certificate and key: --tls-certificates DIR "
                "(server-cert.pem, server-key.pem) or --tls-cert and --tls-key"
            )
        for what, path in (("certificate", cert), ("key", key), ("CA", ca)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"TLS {what} {path} does not exist")
        if verify_peer and ca is None:
            raise ConfigError("--tls-verify-peer needs a CA (ca-cert.pem or --tls-ca)")
        return cls(cert=cert, key=key, ca=ca, verify_peer=verify_peer)


def make_server_context(config: TlsConfig) -> ssl.SSLContext:
    """A server :class:`ssl.SSLContext` for ``config`` (TLS >= 1.2).

    Raises:
        ConfigError: The files cannot be loaded (bad PEM, key not matching the certificate).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.cert, config.key)
        if config.ca is not None:
            ctx.load_verify_locations(cafile=config.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED if config.verify_peer else ssl.CERT_OPTIONAL
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load TLS credentials: {exc}") from exc
    return ctx


def start_tls(ctx: ssl.SSLContext, sock: socket.socket, timeout_s: float) -> TlsSocket:
    """Run the server side of the TLS handshake on ``sock``; return the TLS socket.

    Args:
        ctx: The server context.
        sock: The connected socket, right after the ``OPT_STARTTLS`` ACK was sent.
        timeout_s: How long the TLS handshake may take.

    Raises:
        OSError: ``ssl.SSLError`` if the handshake fails (bad client certificate, no
            common version), ``TimeoutError`` if it does not finish in time.
    """
    sock.settimeout(timeout_s)
    tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    wrapped = TlsSocket(tls)
    wrapped.settimeout(timeout_s)
    return wrapped


class TlsSocket:
    """The part of the socket API a connection uses, over TLS, safe for one reader and
    several writers at once (see the module docstring)."""

    def __init__(self, tls: ssl.SSLSocket) -> None:
        self._tls = tls
        self._fd = tls.fileno()
        self._lock = threading.Lock()
        self._timeout: float | None = None  # Python-level: expiry raises TimeoutError
        self._rcv_timeout: float | None = None  # SO_RCVTIMEO: expiry raises BlockingIOError
        self._snd_timeout: float | None = None
        tls.settimeout(0.0)

    # -- socket API -------------------------------------------------------------------------
    @property
    def family(self) -> int:
        """The underlying socket's address family."""
        return int(self._tls.family)

    def fileno(self) -> int:
        """The underlying file descriptor."""
        return self._fd

    def version(self) -> str | None:
        """The negotiated TLS version, e.g. ``TLSv1.3``."""
        return self._tls.version()

    def getpeercert(self) -> Any:
        """The verified client certificate, if one was presented."""
        return self._tls.getpeercert()

    def settimeout(self, timeout_s: float | None) -> None:
        """As :meth:`socket.socket.settimeout` (None: wait forever or up to SO_RCVTIMEO)."""
        self._timeout = timeout_s

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        """Record receive/send timeouts (they bound the waits here); pass others on."""
        if level == socket.SOL_SOCKET and option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            sec, usec = _TIMEVAL.unpack(value)
            seconds = sec + usec / 1e6
            if option == socket.SO_RCVTIMEO:
                self._rcv_timeout = seconds or None
            else:
                self._snd_timeout = seconds or None
            return
        self._tls.setsockopt(level, option, value)

    def shutdown(self, how: int) -> None:
        """Shut the raw socket down (a reader waiting in ``poll`` sees end-of-file)."""
        socket.socket.shutdown(self._tls, how)

    def close(self) -> None:
        """End the TLS session with a close_notify, then close the socket.

        The spec asks the server to "shut down the TLS session" after ``NBD_CMD_DISC``; a
        client that checks (gnutls, nbd-tester-client) sees a truncation attack otherwise.
        Sending it is bounded by :data:`CLOSE_NOTIFY_NS`: a client that vanished or
        stopped reading costs that much at most, and the ring is detached before this runs.
        The peer's own close_notify is not waited for (as ``SSL_shutdown``'s first call).
        """
        try:
            self._send_close_notify(_CLOCK.now_ns() + CLOSE_NOTIFY_NS)
        finally:
            self._tls.close()

    def _send_close_notify(self, deadline_ns: int) -> None:
        while True:
            with self._lock:
                try:
                    self._tls.unwrap()
                except ssl.SSLWantReadError:
                    return  # ours is sent; the peer's has not come: do not wait for it
                except ssl.SSLWantWriteError:
                    want = select.POLLOUT
                except (OSError, ValueError):
                    return  # the peer is gone (reset, EOF): nothing to notify
                else:
                    return
            left_ms = (deadline_ns - _CLOCK.now_ns()) / NS_PER_MS
            if left_ms <= 0:
                return
            poller = select.poll()
            poller.register(self._fd, want)
            with contextlib.suppress(InterruptedError):
                poller.poll(left_ms)

    def recv(self, n: int) -> bytes:
        """Receive up to ``n`` bytes; ``b""`` at end-of-file."""
        buf = bytearray(n)
        got = self.recv_into(memoryview(buf))
        return bytes(buf[:got])

    def recv_into(self, view: memoryview) -> int:
        """Receive into ``view``; 0 at end-of-file."""
        if not len(view):
            return 0
        while True:
            with self._lock:
                try:
                    return self._tls.recv_into(view)
                except ssl.SSLWantReadError:
                    want = select.POLLIN
                except ssl.SSLWantWriteError:
                    want = select.POLLOUT
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    return 0
            self._wait(want, reading=True)

    def recvmsg_into(self, views: Sequence[memoryview]) -> tuple[int, list[Any], int, Any]:
        """Receive into the first non-empty view (TLS records are not scatter-read)."""
        for v in views:
            if len(v):
                return self.recv_into(v), [], 0, None
        return 0, [], 0, None

    def sendall(self, data: bytes | memoryview) -> None:
        """Send all of ``data``."""
        view = memoryview(data).cast("B")
        while len(view):
            with self._lock:
                try:
                    n = self._tls.send(view)
                except ssl.SSLWantWriteError:
                    want = select.POLLOUT
                except ssl.SSLWantReadError:
                    want = select.POLLIN
                else:
                    view = view[n:]
                    continue
            self._wait(want, reading=False)

    def send(self, data: bytes | memoryview) -> int:
        """Send all of ``data``; return the bytes sent (``socket.send`` may send less)."""
        self.sendall(data)
        return len(data)

    def sendmsg(self, bufs: Sequence[bytes | memoryview]) -> int:
        """Send every buffer (joined: one TLS record stream); return the bytes sent."""
        data = b"".join(bufs)
        self.sendall(data)
        return len(data)

    # -- waiting ----------------------------------------------------------------------------
    def _wait(self, events: int, *, reading: bool) -> None:
        timeout = self._timeout
        blocking_io = False
        if timeout is None:
            timeout = self._rcv_timeout if reading else self._snd_timeout
            blocking_io = timeout is not None
        poller = select.poll()
        poller.register(self._fd, events | select.POLLERR | select.POLLHUP)
        clock = _CLOCK
        deadline = None if timeout is None else clock.now_ns() + round(timeout * NS_PER_S)
        while True:
            left_ms = None if deadline is None else max(0, (deadline - clock.now_ns()) / NS_PER_MS)
            with contextlib.suppress(InterruptedError):
                if poller.poll(left_ms):
                    return
            if deadline is not None and clock.now_ns() >= deadline:
                if blocking_io:
                    raise BlockingIOError("TLS socket wait timed out")
                raise TimeoutError("TLS socket timed out")
