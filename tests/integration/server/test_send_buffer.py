"""A Unix-socket connection's send buffer holds a whole 1 MiB read reply.

A Unix stream socket queues what it sends against the sender's buffer alone (208 KiB by
default), so with the kernel's default a 1 MiB reply leaves in pieces, the ring's thread
sleeping until the client has read each one. ``serve --send-buffer`` (512K by default, which
the kernel doubles) lets the reply go in one call: seen from outside, the ring has finished
the read (its counter moved) while the client has not read a byte of it.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from collections.abc import Callable

from support import Served, raw_transmission, recv_exact, wait_until

REQUEST = struct.Struct(">IHHQQI")
REQUEST_MAGIC = 0x25609513
REPLY = struct.Struct(">IIQ")
SIMPLE_MAGIC = 0x67446698
CMD_READ, CMD_WRITE = 0, 1
MIB = 1 << 20


def _reads_done(served: Served) -> int:
    (ring,) = served.rings()
    return int(ring["requests"]["rd"])


def _write(sock: socket.socket, data: bytes) -> None:
    sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, len(data)) + data)
    assert REPLY.unpack(recv_exact(sock, REPLY.size)) == (SIMPLE_MAGIC, 0, 1)


def test_a_1mib_read_reply_leaves_before_the_client_reads_it(
    serve: Callable[..., Served],
) -> None:
    served = serve("disk=memory:16M")
    sock = raw_transmission(served, b"disk")
    try:
        data = bytes(range(256)) * (MIB // 256)
        _write(sock, data)
        sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, 2, 0, MIB))
        # Counted once the reply's sendmsg returned: with the kernel's default buffer the
        # ring would wait in it until the client reads (here: never, until the assert).
        wait_until(lambda: _reads_done(served) == 1, 10.0, "the read's reply to be sent")
        assert REPLY.unpack(recv_exact(sock, REPLY.size)) == (SIMPLE_MAGIC, 0, 2)
        assert recv_exact(sock, MIB) == data
    finally:
        sock.close()


def test_send_buffer_zero_leaves_the_kernels_default(serve: Callable[..., Served]) -> None:
    served = serve("disk=memory:16M", extra=("--send-buffer", "0"))
    sock = raw_transmission(served, b"disk")
    try:
        sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, 1, 0, MIB))
        # The reply cannot leave in one call: the ring is still in sendmsg (not counted)
        # once the socket holds all it can, and finishes as soon as the client reads.
        wait_until(lambda: _queued_to(sock) > 0, 10.0, "the first part of the reply")
        assert _reads_done(served) == 0
        assert REPLY.unpack(recv_exact(sock, REPLY.size)) == (SIMPLE_MAGIC, 0, 1)
        assert recv_exact(sock, MIB) == bytes(MIB)
        wait_until(lambda: _reads_done(served) == 1, 10.0, "the read to be counted")
    finally:
        sock.close()


def _queued_to(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue (FIONREAD)."""
    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])
