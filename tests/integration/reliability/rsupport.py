"""Helpers of the reliability tests: a raw NBD client, certificates, process probes."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from pathlib import Path

from support import IHAVEOPT, recv_exact, start_handshake

REPLY_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 2, 3, 5, 6, 7  # EXPORT_NAME: support
REP_ACK, REP_INFO = 1, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_ZEROES = 0, 1, 2, 3, 4, 6
FLAG_FUA = 1
REQ = struct.Struct(">IHHQQI")
REPLY = struct.Struct(">IIQ")
USR = "/usr/bin"


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go_data(name: bytes, infos: tuple[int, ...] = ()) -> bytes:
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def read_option_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    magic, opt, rep, length = struct.unpack(">QIII", recv_exact(sock, 20))
    assert magic == REPLY_MAGIC, hex(magic)
    return opt, rep, recv_exact(sock, length)


def greet(path: str, timeout_s: float = 10.0) -> socket.socket:
    """Connect and read the greeting; send client flags FIXED_NEWSTYLE|NO_ZEROES."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sock.connect(path)
    start_handshake(sock)
    return sock


def go(sock: socket.socket, name: bytes) -> tuple[int, int, int]:
    """OPT_GO; returns (reply type of the last reply, size, tflags)."""
    sock.sendall(option(OPT_GO, go_data(name)))
    size = tflags = 0
    while True:
        _, rep, data = read_option_reply(sock)
        if rep == REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
            _, size, tflags = struct.unpack(">HQH", data)
        if rep != REP_INFO:
            return rep, size, tflags


def connect(path: str, name: bytes = b"", timeout_s: float = 10.0) -> tuple[socket.socket, int]:
    """A connection in the transmission phase; returns (socket, export size)."""
    sock = greet(path, timeout_s)
    rep, size, _ = go(sock, name)
    assert rep == REP_ACK, rep
    return sock, size


def request(cmd: int, offset: int, length: int, cookie: int = 1, flags: int = 0) -> bytes:
    return REQ.pack(REQ_MAGIC, flags, cmd, cookie, offset, length)


def simple_reply(sock: socket.socket, data_len: int = 0) -> tuple[int, int, bytes]:
    """(error, cookie, data); data is read only on success."""
    magic, err, cookie = REPLY.unpack(recv_exact(sock, 16))
    assert magic == SIMPLE_MAGIC, hex(magic)
    return err, cookie, (recv_exact(sock, data_len) if err == 0 and data_len else b"")


def rst_close(sock: socket.socket) -> None:
    """Close abruptly (SO_LINGER 0: a TCP RST; on Unix sockets an immediate close)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def libnbd(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with Debian's python3 (which has the ``nbd`` module)."""
    return subprocess.run(
        [f"{USR}/python3", "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PATH": f"{USR}:{os.environ.get('PATH', '')}"},
    )


def make_certs(d: Path) -> Path:
    """CA, server and client certificates in nbdkit/libnbd/qemu's directory layout."""
    d.mkdir(parents=True, exist_ok=True)

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=keyCertSign",
    )
    for who, ext in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (d / f"{who}.ext").write_text("basicConstraints=CA:FALSE\n" + ext)
        ssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={'localhost' if who == 'server' else 'client'}",
            "-keyout",
            f"{who}-key.pem",
            "-out",
            f"{who}.csr",
        )
        ssl(
            "x509",
            "-req",
            "-in",
            f"{who}.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{who}-cert.pem",
            "-extfile",
            f"{who}.ext",
        )
    for p in d.glob("*-key.pem"):
        p.chmod(0o600)
    return d
