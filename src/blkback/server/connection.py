"""One NBD connection = one ring: handshake, then the ring's loop, on one OS thread.

The loop is ``xen_blkif_schedule`` in userspace:

1. wait for requests in a blocking ``recv_into``, at most until the ring's next pass is due:
   the socket's ``SO_RCVTIMEO`` is the kernel's ``wait_event_interruptible_timeout``, so the
   hot path costs one syscall per batch and no ``poll``;
2. take every complete request already received (batched parsing), give each the pages of
   its payload from the ring's pool, do its I/O straight into or out of those pages, and send
   all replies of the batch with one ``sendmsg``;
3. put the pages back into the pool, and run the loop pass, which trims the pool to
   ``max_buffer_pages`` or squeezes it to 0.

Write payloads are received straight into the request's pages with ``recvmsg_into``, except
for the bytes that arrived together with the headers in the staging buffer (small writes in
a pipelined batch), which are copied once into the pages: for 4 KiB writes one memcpy is
cheaper than one more syscall per request.

A squeeze does not need the ring's thread: ``Ring.request_wake`` runs the ring's pass at
once on the thread that delivered the pressure report, under the ring lock (the pool lock of
the kernel), so an idle ring blocked in ``recv`` is emptied within the report's own latency.

Backends that may block (``Storage.inline`` is false: files, delay and rate filters) run on
a per-ring pool of worker threads so that many requests are in flight at once, like the
kernel's pending requests; workers reply under the connection's send lock and give the pages
back under the ring lock. ``oo`` counts the times the ring ran out of request slots.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from blkback.clock import NS_PER_S, NS_PER_US
from blkback.core.pages import PAGE_SIZE, MmapAllocator
from blkback.core.ring import Ring
from blkback.errors import ProtocolError, RequestError
from blkback.protocol.constants import (
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    ReplyFlag,
    ReplyType,
    TFlag,
)
from blkback.protocol.handshake import HandshakeState, Negotiated, ServerHandshake
from blkback.protocol.transmission import REQUEST, REQUEST_SIZE, Transmission
from blkback.server import oplog
from blkback.server.tls import TlsSocket, start_tls
from blkback.storage.base import os_error

if TYPE_CHECKING:
    from blkback.server.exports import Export
    from blkback.server.server import Server

log = logging.getLogger("blkback.connection")

STAGING_BYTES = 256 * 1024
GROUP_PAGES = 64  # a group of fast requests takes at most about this many pages
LARGE_PAYLOAD = 64 * 1024  # a write this large is received straight into its pages
PAGE_SHIFT = 12
PAGE_SIZE_MASK = PAGE_SIZE - 1
_SIMPLE = struct.Struct(">IIQ")
_OFFSET_DATA = struct.Struct(">IHHQIQ")  # structured chunk header (DONE, OFFSET_DATA) + offset
IOV_MAX = 1024
MSG_DONTWAIT = socket.MSG_DONTWAIT
MAX_SEND_BYTES = 1 << 30

C_READ = int(Cmd.READ)
C_WRITE = int(Cmd.WRITE)
C_DISC = int(Cmd.DISC)
C_FLUSH = int(Cmd.FLUSH)
C_TRIM = int(Cmd.TRIM)
C_CACHE = int(Cmd.CACHE)
C_ZEROES = int(Cmd.WRITE_ZEROES)
C_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
R_DONE = int(ReplyFlag.DONE)
R_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
F_FUA = int(CmdFlag.FUA)
F_NO_HOLE = int(CmdFlag.NO_HOLE)
F_FAST_ZERO = int(CmdFlag.FAST_ZERO)
F_REQ_ONE = int(CmdFlag.REQ_ONE)


def _structured_read_header(cookie: int, offset: int, length: int) -> bytes:
    """The one chunk of a successful structured READ reply: OFFSET_DATA with DONE."""
    return _OFFSET_DATA.pack(
        STRUCTURED_REPLY_MAGIC, R_DONE, R_OFFSET_DATA, cookie, length + 8, offset
    )


def _simple_read_header(cookie: int, offset: int, length: int) -> bytes:
    """A successful simple READ reply's header (the data follows)."""
    return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie)


def _never(buf: memoryview, nbytes: int, flags: int) -> int:
    raise AssertionError("busy polling over TLS")


def _wants_tls(hs: ServerHandshake) -> bool:
    return hs.state is HandshakeState.START_TLS


class Disconnect(Exception):  # noqa: N818 (control flow, not an error)
    """The client asked to disconnect, or went away."""


class Connection:
    """Serves one client socket until it disconnects or the server stops."""

    def __init__(self, server: Server, sock: socket.socket, peer: str) -> None:
        self.server = server
        # After STARTTLS this is a TlsSocket: the same calls, over TLS (see server/tls.py).
        self.sock: socket.socket | TlsSocket = sock
        self.peer = peer
        self.ring: Ring | None = None
        self.export: Export | None = None
        self.trace = False  # -vv: log every request (and serve all by the general path)
        self.allocator: MmapAllocator | None = None
        self.send_lock = threading.Lock()
        self.ring_lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._work: queue.SimpleQueue[tuple[int, int, int, int, int, list[int]] | None] = (
            queue.SimpleQueue()
        )
        self._slots: threading.Semaphore | None = None
        self._fatal: BaseException | None = None
        self._inflight = 0  # requests handed to workers and not finished
        self._idle = threading.Condition()
        self.max_payload = 0
        # Pages per group of fast requests (see _loop): one pool call and one sendmsg per
        # group. 1 serves request by request (for comparisons).
        self.group_pages = max(1, int(os.environ.get("BLKBACK_GROUP_PAGES", str(GROUP_PAGES))))
        self.closed = threading.Event()
        self._alloc_failed_ns = -(10**18)  # last page allocation failure
        self._alloc_backoff_ns = 0

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Run the connection on its own thread."""
        self.thread = threading.Thread(target=self.run, name=f"ring-{self.peer}", daemon=True)
        self.thread.start()

    def wake_pass(self) -> None:
        """Run the ring's loop pass now, on the calling thread (a squeeze began)."""
        ring = self.ring
        if ring is None:
            return
        with self.ring_lock:
            if not ring.closed:
                at = ring.wake_ns if ring.wake_ns is not None else self.server.clock.now_ns()
                ring.loop_pass(at, had_io=False, woken=True)

    def stop_reading(self) -> None:
        """Make the ring's blocking ``recv`` return end-of-file: the graceful stop.

        Requests already received are finished and answered; nothing more is read.
        """
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)

    def run(self) -> None:
        """The thread body: handshake, transmission, and cleanup whatever happens."""
        try:
            negotiated, leftover = self._handshake()
            if negotiated is not None:
                self._transmission(negotiated, leftover)
        except (ConnectionError, TimeoutError, Disconnect):
            pass
        except ProtocolError as exc:
            log.info("%s: protocol error, closing: %s", self.peer, exc)
        except OSError as exc:
            log.info("%s: connection error: %s", self.peer, exc)
        except Exception:
            log.exception("%s: internal error, closing the connection", self.peer)
        finally:
            try:
                self._close()
            except Exception:
                log.exception("%s: internal error while closing the connection", self.peer)

    def _close(self) -> None:
        try:
            self._stop_workers()
            oplog.closed(self.peer, self.export, self.ring)  # its counters are final now
            if self.ring is not None:
                self._reclaim_abandoned_pages()
                self.server.detach_ring(self)
                self.ring = None
            if self.allocator is not None:
                self.allocator.close()
        finally:
            # Whatever went wrong above, the client and the server's table let go of us.
            with contextlib.suppress(OSError):
                self.sock.close()
            self.server.connection_closed(self)
            self.closed.set()

    def _reclaim_abandoned_pages(self) -> None:
        """Return the pages of requests that died with the connection to the pool.

        A client that vanishes mid-payload, or while its replies are sent, ends the ring's
        batch with an exception while that request (and replies not yet sent) still hold
        pages. The workers are stopped by now, so every page in flight belongs to the dead
        batch: those are the allocator's live pages that are not in the pool. Finding them
        here keeps the hot path free of bookkeeping for a rare event.
        """
        ring = self.ring
        alloc = self.allocator
        assert ring is not None and alloc is not None
        with self.ring_lock:
            n = ring.pool.in_flight
            if not n:
                return
            pooled = set(ring.pool.free_page_ids())
            lost = [p for p in alloc.live_ids() if p not in pooled]
            if len(lost) != n:
                # Never guess: a page put back twice would be handed to two requests.
                log.error("%s: %d pages in flight but %d unaccounted", self.peer, n, len(lost))
                return
            ring.put_pages(lost)
            extra = ring.stats.extra
            extra["pages_reclaimed_at_close"] = extra.get("pages_reclaimed_at_close", 0) + n
        log.info("%s: %d pages of unfinished requests returned at close", self.peer, n)

    # -- handshake ------------------------------------------------------------------------
    def _handshake(self) -> tuple[Negotiated | None, bytes]:
        server = self.server
        sock = self.sock
        timeout_s = server.config.handshake_timeout_ns / NS_PER_S
        sock.settimeout(timeout_s)
        hs = ServerHandshake(
            oplog.RefusalLog(server.catalog, self.peer),
            tls=server.config.tls,
            max_option_len=server.config.max_option_bytes,
            max_options=server.config.max_options,
        )
        sock.sendall(hs.initial_bytes())
        # One deadline for the whole handshake (TLS included), not per recv: a client that
        # drips a byte at a time must not hold a thread forever.
        clock = server.clock
        deadline_ns = clock.now_ns() + int(timeout_s * 1e9)
        while hs.state is HandshakeState.IN_PROGRESS:
            try:
                left_s = (deadline_ns - clock.now_ns()) / 1e9
                if left_s <= 0:
                    raise TimeoutError
                sock.settimeout(left_s)
                data = sock.recv(65536)
            except TimeoutError:
                log.info("%s: handshake not finished in time, dropped", self.peer)
                return None, b""
            out = hs.feed(data)
            if out:
                sock.sendall(out)
            if _wants_tls(hs):  # (a call: mypy keeps hs.state narrowed otherwise)
                ctx = server.config.tls_context
                assert ctx is not None and isinstance(sock, socket.socket)
                # The handshake timeout covers the TLS handshake too.
                left_s = max(0.001, (deadline_ns - clock.now_ns()) / 1e9)
                self.sock = sock = start_tls(ctx, sock, left_s)
                hs.tls_started()
                continue
            if not data:
                break
        if hs.state is HandshakeState.DONE and hs.negotiated is not None:
            return hs.negotiated, hs.leftover
        if hs.error is not None:
            log.info("%s: handshake failed: %s", self.peer, hs.error)
        return None, b""

    # -- transmission ---------------------------------------------------------------------
    def _transmission(self, neg: Negotiated, leftover: bytes) -> None:
        server = self.server
        export = server.catalog.get(neg.export.name)
        if export is None:  # removed meanwhile
            return
        self.export = export
        self.codec = Transmission(neg)
        self.storage = export.storage
        self.structured = neg.structured_replies
        self.contexts = sorted(neg.meta_contexts)
        self.max_payload = self.codec.max_write_payload
        self.export_size = neg.export.size
        self.max_block = neg.export.max_block
        self.writable = not neg.tflags & TFlag.READ_ONLY
        self.plain_fd = getattr(self.storage, "plain_fd", -1)
        mem = getattr(self.storage, "mem", None)
        self.mem: memoryview | None = mem if isinstance(mem, memoryview) else None
        self.allocator = MmapAllocator(
            chunk_pages=server.config.chunk_pages,
            mlock=server.config.mlock,
            warn=server.warn_once,
        )
        self.ring = server.attach_ring(self, export)
        self.ring.waker = self.wake_pass
        oplog.connected(self.peer, neg)
        self.trace = oplog.tracing()
        if not self.storage.inline:
            self._start_workers(server.config.workers)
        self.sock.settimeout(None)  # blocking; waits are bounded by SO_RCVTIMEO below
        self._set_timeouts(server.params.lru_interval_ms * 1_000_000)
        self._loop(leftover)

    def _set_timeouts(self, recv_ns: int) -> None:
        recv_us = max(1000, recv_ns // 1000)
        tv = struct.pack("ll", recv_us // 1_000_000, recv_us % 1_000_000)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        send_us = self.server.config.io_timeout_ns // NS_PER_US
        tv = struct.pack("ll", send_us // 1_000_000, send_us % 1_000_000)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    def _loop(self, leftover: bytes) -> None:
        """The ring's loop: receive, serve every complete request, run the pass; repeat.

        The common requests (READ and WRITE without flags, inside the export, on storage
        that is the server's memory or a plain descriptor, served inline) are served in
        *groups*: the complete requests at the front of the staging buffer, up to
        ``group_pages`` pages, take their pages from the pool in one call, do their I/O, send
        their replies in one ``sendmsg`` and give the pages back in one call. A group is what
        one pass of the kernel's ``do_block_io_op`` maps at once; 16 random 4 KiB requests are
        one group, a 1 MiB request is a group of its own (so that the pages of a stream of
        large requests are reused request after request and the pool stays small). Anything
        else goes one request at a time through ``Transmission.check`` and ``_execute``.

        Everything the hot path needs is bound once here, not per batch: at QD1 a batch is
        one request, and the per-batch set-up was a measurable part of its cost.
        """
        ring = self.ring
        alloc = self.allocator
        assert ring is not None and alloc is not None
        server = self.server
        now_ns = server.clock.now_ns
        sock = self.sock
        recv_into = sock.recv_into
        staging = bytearray(STAGING_BYTES)
        view = memoryview(staging)
        start = 0
        end = len(leftover)
        staging[:end] = leftover
        idle_timeout_ns = server.config.idle_timeout_ns
        last_request_ns = now_ns()
        storage = self.storage
        fast = storage.inline and (self.mem is not None or self.plain_fd >= 0) and not self.trace
        stats = ring.stats
        lock = self.ring_lock
        get_pages = ring.get_pages
        put_pages = ring.put_pages
        loop_pass = ring.loop_pass
        spans = alloc.spans
        page_views = alloc.page_views
        group_pages = self.group_pages
        plain_fd = self.plain_fd
        mem = self.mem
        mark = getattr(storage, "mark", None)
        # The memory backend's map of pages that may hold data (see AnonMemoryStorage.mark).
        used: bytearray = getattr(storage, "used", bytearray())
        size = self.export_size
        max_block = self.max_block
        writable = self.writable
        unpack = REQUEST.unpack_from
        simple = _SIMPLE.pack
        read_header = _structured_read_header if self.structured else _simple_read_header
        preadv = os.preadv
        pwritev = os.pwritev
        send = self._send
        small_recv = False
        # Busy polling needs the plain socket's recv flags (not over TLS).
        # Only a ring that serves inline polls (a ring with workers would take the GIL from
        # its own workers), and only while the server has no more connections than polling
        # slots (a precaution: a spinning thread takes the GIL back at every recv, from
        # every other ring of the process; see docs/design-notes.md).
        poll_recv: Callable[[memoryview, int, int], int] = _never
        poll_ns = 0
        if isinstance(sock, socket.socket) and fast:
            poll_recv = sock.recv_into
            poll_ns = server.config.poll_ns
        poll_slots = server.poll_slots
        connections = server.connections
        served = False  # a batch was just served: poll before sleeping
        while True:
            if self._fatal is not None:
                raise self._fatal
            if end - start < REQUEST_SIZE:
                if start:
                    # Keep the partial header at the front of the staging buffer.
                    staging[: end - start] = view[start:end]
                    end -= start
                    start = 0
                try:
                    # After a large write received straight into its pages, receive the next
                    # header alone rather than a staging buffer's worth of the next payload,
                    # which would then be copied once more.
                    dst = view[end:REQUEST_SIZE] if small_recv else view[end:]
                    n = -1
                    if served and poll_ns and len(connections) <= len(poll_slots):
                        # Busy polling right after a batch (see ServerConfig.poll_ns).
                        served = False
                        for slot in poll_slots:
                            if slot.acquire(False):
                                try:
                                    deadline = now_ns() + poll_ns
                                    while True:
                                        try:
                                            n = poll_recv(dst, 0, MSG_DONTWAIT)
                                            break
                                        except BlockingIOError:
                                            if now_ns() >= deadline:
                                                break
                                finally:
                                    slot.release()
                                break
                    if n < 0:
                        n = recv_into(dst)
                except BlockingIOError:
                    # SO_RCVTIMEO expired: the ring was idle until its pass is due.
                    if server.stopping:
                        raise Disconnect from None
                    now = now_ns()
                    if idle_timeout_ns and now - last_request_ns > idle_timeout_ns:
                        log.info("%s: idle timeout", self.peer)
                        raise Disconnect from None
                    if ring.pass_due(now):
                        self._pass(now, had_io=False, woken=False)
                    self._set_timeouts(ring.next_pass_ns() - now_ns())
                    continue
                if n == 0:
                    raise Disconnect
                small_recv = False
                end += n
                continue
            # A batch: every complete request in the staging buffer.
            now = now_ns()
            while end - start >= REQUEST_SIZE:
                # 1. The group: fast requests whose headers (and write payloads) are
                #    staged; a write whose payload is still arriving ends it.
                group: list[tuple[int, int, int, int, int]] = []
                need = 0
                pos = start
                while fast and need < group_pages and end - pos >= REQUEST_SIZE:
                    magic, flags, cmd, cookie, offset, length = unpack(view, pos)
                    if (
                        magic != REQUEST_MAGIC
                        or flags
                        or not 0 < length <= max_block
                        or offset + length > size
                    ):
                        break
                    if cmd == C_READ:
                        pos += REQUEST_SIZE
                    elif cmd == C_WRITE and writable:
                        pos += REQUEST_SIZE + length
                    else:
                        break
                    npages = (length + PAGE_SIZE_MASK) >> PAGE_SHIFT
                    group.append((cmd, cookie, offset, length, npages))
                    need += npages
                    if pos >= end:
                        break
                if not group:
                    start, end = self._one_request(view, start, end)
                    continue
                # 2. Its pages, in one call.
                try:
                    with lock:
                        pages = get_pages(need, now)
                except MemoryError:
                    # Serve the first request alone: it gets pages or its ENOMEM reply.
                    start, end = self._one_request(view, start, end)
                    continue
                # 3. Its I/O, in order, and one send; the pages go back once their data is
                #    out (or the connection failed: nothing else holds them then).
                try:
                    out: list[bytes | memoryview] = []
                    j = 0
                    for cmd, cookie, offset, length, npages in group:
                        start += REQUEST_SIZE
                        if npages == 1 and mem is not None:
                            # One page to or from the server's memory: the common 4 KiB case,
                            # written out without lists and loops.
                            v = page_views[pages[j]]
                            j += 1
                            if length != PAGE_SIZE:
                                v = v[:length]
                            if cmd == C_READ:
                                v[:] = mem[offset : offset + length]
                                stats.rd_req += 1
                                stats.rd_bytes += length
                                out.append(read_header(cookie, offset, length))
                                out.append(v)
                                continue
                            if end - start >= length:
                                v[:] = view[start : start + length]
                                start += length
                            else:
                                start = end = self._receive_payload(view, start, end, length, [v])
                            # Data first, then the mark (see AnonMemoryStorage.mark).
                            mem[offset : offset + length] = v
                            used[offset >> PAGE_SHIFT] = 1
                            used[(offset + length - 1) >> PAGE_SHIFT] = 1
                            stats.wr_req += 1
                            stats.wr_bytes += length
                            out.append(simple(SIMPLE_REPLY_MAGIC, 0, cookie))
                            continue
                        if npages == 1:
                            v = page_views[pages[j]]
                            views = [v if length == PAGE_SIZE else v[:length]]
                        else:
                            views = spans(pages[j : j + npages], length)
                        j += npages
                        if cmd == C_READ:
                            if mem is not None:
                                p = offset
                                for v in views:
                                    n = len(v)
                                    v[:] = mem[p : p + n]
                                    p += n
                            else:
                                try:
                                    if preadv(plain_fd, views, offset) != length:
                                        self._fill_short_read(views, offset, length)
                                except (OSError, RequestError) as exc:
                                    out.append(self._io_error_reply(cookie, exc))
                                    continue
                            stats.rd_req += 1
                            stats.rd_bytes += length
                            out.append(read_header(cookie, offset, length))
                            out.extend(views)
                            continue
                        if end - start >= length:
                            # Staged with the headers: one copy into the pages.
                            self._receive_payload(view, start, end, length, list(views))
                            start += length
                        else:
                            start = end = self._receive_payload(
                                view, start, end, length, list(views)
                            )
                            small_recv = length >= LARGE_PAYLOAD
                        if mem is not None:
                            assert mark is not None
                            p = offset
                            for v in views:
                                n = len(v)
                                mem[p : p + n] = v
                                p += n
                            mark(offset, length)  # after the data (AnonMemoryStorage.mark)
                        else:
                            try:
                                if pwritev(plain_fd, views, offset) != length:
                                    storage.pwritev(views, offset, False)  # finish a short one
                            except (OSError, RequestError) as exc:
                                out.append(self._io_error_reply(cookie, exc))
                                continue
                        stats.wr_req += 1
                        stats.wr_bytes += length
                        out.append(simple(SIMPLE_REPLY_MAGIC, 0, cookie))
                    send(out)
                finally:
                    with lock:
                        put_pages(pages)
            # The loop pass after the I/O: trim, or squeeze.
            served = True
            last_request_ns = now = now_ns()
            with lock:
                loop_pass(now, had_io=True, woken=False)

    def _pass(self, now_ns: int, *, had_io: bool, woken: bool) -> None:
        ring = self.ring
        assert ring is not None
        with self.ring_lock:
            ring.loop_pass(now_ns, had_io=had_io, woken=woken)

    def _one_request(self, view: memoryview, start: int, end: int) -> tuple[int, int]:
        """Parse and serve the request at ``start``; return the new staging ``(start, end)``."""
        magic, flags, cmd, cookie, offset, length = REQUEST.unpack_from(view, start)
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic 0x{magic:08x}")
        if self.trace:
            oplog.request(self.peer, cmd, flags, offset, length)
        out: list[bytes | memoryview] = []
        held: list[int] = []
        try:
            start, end = self._slow_request(
                view, start + REQUEST_SIZE, end, flags, cmd, cookie, offset, length, out, held
            )
            self._send(out)
        finally:
            self._return(held)
        return start, end

    def _alloc_backoff(self) -> None:
        """After a failed page allocation, pause the ring before its next request.

        The failed request is answered ENOMEM at once (never left waiting for a page); the
        pause, 1 ms doubling up to one pass interval while failures keep coming within a
        second, keeps a ring from spinning on an allocator that cannot give memory, and gives
        reclaim a chance. The next success needs nothing: the pause simply stops doubling.
        """
        now = self.server.clock.now_ns()
        cap_ns = self.server.params.lru_interval_ms * 1_000_000
        if now - self._alloc_failed_ns > 1_000_000_000:
            self._alloc_backoff_ns = 1_000_000
        else:
            self._alloc_backoff_ns = min(2 * self._alloc_backoff_ns, cap_ns)
        self._alloc_failed_ns = now
        ring = self.ring
        if ring is not None:
            ring.stats.extra["alloc_backoff_ms"] = (
                ring.stats.extra.get("alloc_backoff_ms", 0) + self._alloc_backoff_ns // 1_000_000
            )
        time.sleep(self._alloc_backoff_ns / 1e9)

    def _io_error_reply(self, cookie: int, exc: OSError | RequestError) -> bytes:
        """The error reply of a fast-path request whose storage I/O failed.

        A raw ``OSError`` (from the plain descriptor) is mapped by the storage layer's
        :func:`os_error`, so the client sees what the slow path would have sent.
        """
        err = os_error(exc, "fast-path I/O") if isinstance(exc, OSError) else exc
        ring = self.ring
        if ring is not None:
            ring.stats.errors += 1
        oplog.error_reply(self.peer, err.errno, str(err))
        return self.codec.error_reply(cookie, err.errno, str(err))

    def _fill_short_read(self, views: list[memoryview], offset: int, length: int) -> None:
        """A plain read came back short: redo it through the storage layer (which loops)."""
        self.storage.preadv(views, offset)

    def _slow_request(
        self,
        view: memoryview,
        start: int,
        end: int,
        flags: int,
        cmd: int,
        cookie: int,
        offset: int,
        length: int,
        out: list[bytes | memoryview],
        held: list[int],
    ) -> tuple[int, int]:
        """Any request the fast path does not take: validated by the codec, run by
        ``_execute`` inline or by a worker. Returns the new staging ``(start, end)``."""
        ring = self.ring
        assert ring is not None
        codec = self.codec
        stats = ring.stats
        pages: list[int] = []
        now = self.server.clock.now_ns()
        try:
            if cmd == C_WRITE:
                try:
                    codec.check(flags, cmd, offset, length)
                except RequestError:
                    start = self._discard_payload(view, start, end, length)
                    raise
                with self.ring_lock:
                    pages = ring.get_pages((length + PAGE_SIZE_MASK) >> PAGE_SHIFT, now)
                start = self._receive_payload(view, start, end, length, self._views(pages, length))
            else:
                codec.check(flags, cmd, offset, length)
                if cmd == C_DISC:
                    self._send(out)
                    out.clear()
                    self._return(held)
                    held.clear()
                    self._drain_workers()
                    raise Disconnect
                if cmd == C_READ:
                    with self.ring_lock:
                        pages = ring.get_pages((length + PAGE_SIZE_MASK) >> PAGE_SHIFT, now)
        except RequestError as exc:
            stats.errors += 1
            oplog.error_reply(self.peer, exc.errno, str(exc), cmd, offset, length)
            out.append(codec.error_reply(cookie, exc.errno, str(exc)))
            return start, max(end, start)
        except MemoryError:
            # The pool could not grow: fail this request as the kernel does (the pages
            # gathered so far already went back to the pool in get_many).
            stats.errors += 1
            oplog.error_reply(self.peer, errno.ENOMEM, "out of memory for buffers", cmd)
            if cmd == C_WRITE:
                start = self._discard_payload(view, start, end, length)
            out.append(codec.error_reply(cookie, errno.ENOMEM, "out of memory for buffers"))
            # The replies so far go out now, not after the pause.
            self._send(out)
            out.clear()
            self._alloc_backoff()
            return start, max(end, start)
        end = max(end, start)
        if self.storage.inline:
            out.extend(self._execute(flags, cmd, cookie, offset, length, pages))
            held.extend(pages)
        else:
            if out:
                self._send(out)
                out.clear()
                self._return(held)
                held.clear()
            self._submit((flags, cmd, cookie, offset, length, pages))
        return start, end

    def _return(self, pages: list[int]) -> None:
        if pages:
            ring = self.ring
            assert ring is not None
            with self.ring_lock:
                ring.put_pages(pages)

    def _views(self, pages: list[int], length: int) -> list[memoryview]:
        alloc = self.allocator
        assert alloc is not None
        return alloc.spans(pages, length) if pages else []

    def _execute(
        self, flags: int, cmd: int, cookie: int, offset: int, length: int, pages: list[int]
    ) -> list[bytes | memoryview]:
        """Do one request's I/O; return its reply buffers (header + data for reads)."""
        ring = self.ring
        assert ring is not None
        stats = ring.stats
        storage = self.storage
        codec = self.codec
        try:
            if cmd == C_READ:
                views = self._views(pages, length)
                storage.preadv(views, offset)
                stats.rd_req += 1
                stats.rd_bytes += length
                if self.structured:
                    return [codec.chunk_offset_data_header(cookie, offset, length, True), *views]
                return [codec.simple_reply(cookie), *views]
            if cmd == C_WRITE:
                storage.pwritev(self._views(pages, length), offset, bool(flags & F_FUA))
                stats.wr_req += 1
                stats.wr_bytes += length
            elif cmd == C_FLUSH:
                storage.flush()
                stats.f_req += 1
            elif cmd == C_TRIM:
                storage.trim(offset, length, bool(flags & F_FUA))
                stats.ds_req += 1
            elif cmd == C_ZEROES:
                storage.zero(
                    offset,
                    length,
                    may_trim=not flags & F_NO_HOLE,
                    fast_only=bool(flags & F_FAST_ZERO),
                    fua=bool(flags & F_FUA),
                )
                stats.wr_req += 1
            elif cmd == C_CACHE:
                storage.cache(offset, length)
                stats.other_req += 1
            elif cmd == C_BLOCK_STATUS:
                stats.other_req += 1
                return [self._block_status(flags, cookie, offset, length)]
            return [codec.simple_reply(cookie)]
        except RequestError as exc:
            stats.errors += 1
            oplog.error_reply(self.peer, exc.errno, str(exc), cmd, offset, length)
            return [codec.error_reply(cookie, exc.errno, str(exc))]

    def _block_status(self, flags: int, cookie: int, offset: int, length: int) -> bytes:
        extents = self.storage.extents(offset, length)
        clipped: list[tuple[int, int]] = []
        left = length
        for ext_len, ext_flags in extents:
            if left <= 0:
                break
            n = min(ext_len, left)
            if n <= 0:
                continue
            clipped.append((n, ext_flags))
            left -= n
        if not clipped:
            clipped = [(length, 0)]
        if flags & F_REQ_ONE:
            clipped = clipped[:1]
        parts = []
        for i, ctx in enumerate(self.contexts):
            done = i == len(self.contexts) - 1
            parts.append(self.codec.chunk_block_status(cookie, ctx, clipped, done))
        return b"".join(parts)

    # -- payloads -------------------------------------------------------------------------
    def _receive_payload(
        self, view: memoryview, start: int, end: int, length: int, views: list[memoryview]
    ) -> int:
        """Fill ``views`` (a request's spans) with the write payload; return the new start.

        The staged part is copied; the rest is received straight into the pages. ``views``
        is consumed: pass a list the caller does not need afterwards.
        """
        staged = min(end - start, length)
        pos = 0  # bytes of payload in place
        i = 0
        while pos < staged:
            v = views[i]
            n = min(len(v), staged - pos)
            v[:n] = view[start + pos : start + pos + n]
            pos += n
            if n == len(v):
                i += 1
            else:
                views[i] = v[n:]
        if pos < length:
            self._recv_into_views(views[i:], length - pos)
        return start + staged

    def _recv_into_views(self, views: list[memoryview], total: int) -> None:
        sock = self.sock
        got = 0
        # When the current stall was first seen (a receive timeout expired with no data):
        # the payload may take as long as it likes while bytes keep coming, but no byte for
        # io_timeout_ns (by the clock, not by counting timeouts, whose length varies after
        # wake passes) ends the connection.
        stalled_ns: int | None = None
        clock = self.server.clock
        i = 0  # first view not yet full
        while got < total:
            try:
                n = sock.recvmsg_into(views[i : i + IOV_MAX])[0]
            except BlockingIOError:
                # The client stalls mid-payload: keep the ring's passes going meanwhile.
                now = clock.now_ns()
                ring = self.ring
                if ring is not None and ring.pass_due(now):
                    self._pass(now, had_io=False, woken=False)
                if stalled_ns is None:
                    stalled_ns = now
                elif now - stalled_ns > self.server.config.io_timeout_ns:
                    raise TimeoutError("client stalled mid-request") from None
                continue
            if n == 0:
                raise Disconnect
            stalled_ns = None
            got += n
            while n:
                v = views[i]
                if n >= len(v):
                    n -= len(v)
                    i += 1
                else:
                    views[i] = v[n:]
                    n = 0

    def _discard_payload(self, view: memoryview, start: int, end: int, length: int) -> int:
        """Skip a refused write's payload so that the stream stays in sync."""
        if length > self.max_payload:
            raise ProtocolError(f"write payload of {length} bytes exceeds the maximum")
        staged = min(end - start, length)
        rest = length - staged
        scratch = bytearray(min(rest, 1 << 20)) if rest else bytearray()
        while rest:
            n = min(rest, len(scratch))
            self._recv_into_views([memoryview(scratch)[:n]], n)
            rest -= n
        return start + staged

    # -- sending --------------------------------------------------------------------------
    def _send(self, bufs: list[bytes | memoryview]) -> None:
        if not bufs:
            return
        sock = self.sock
        with self.send_lock:
            while bufs:
                chunk = bufs[:IOV_MAX]
                try:
                    sent = sock.sendmsg(chunk)
                except BlockingIOError:
                    raise TimeoutError("client stopped reading replies") from None
                # Drop what went out, keep the unsent tail.
                k = 0
                while k < len(chunk) and sent >= len(chunk[k]):
                    sent -= len(chunk[k])
                    k += 1
                if k < len(chunk) and sent:
                    bufs = [memoryview(chunk[k])[sent:], *bufs[k + 1 :]]
                else:
                    bufs = bufs[k:]

    # -- workers (blocking backends) ------------------------------------------------------
    def _start_workers(self, n: int) -> None:
        self._slots = threading.Semaphore(self.server.config.max_requests_per_ring)
        for i in range(n):
            t = threading.Thread(target=self._worker, name=f"ring-{self.peer}-w{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def _submit(self, req: tuple[int, int, int, int, int, list[int]]) -> None:
        slots = self._slots
        assert slots is not None
        if not slots.acquire(blocking=False):
            ring = self.ring
            assert ring is not None
            ring.stats.oo_req += 1
            slots.acquire()
        self._inflight_add(1)
        self._work.put(req)

    def _inflight_add(self, n: int) -> None:
        with self._idle:
            self._inflight += n
            if self._inflight == 0:
                self._idle.notify_all()

    def _worker(self) -> None:
        while True:
            req = self._work.get()
            if req is None:
                return
            flags, cmd, cookie, offset, length, pages = req
            try:
                reply = self._execute(flags, cmd, cookie, offset, length, pages)
                self._send(reply)
            except BaseException as exc:  # a dead socket, or a bug: end the connection
                if self._fatal is None:
                    self._fatal = exc if isinstance(exc, OSError) else Disconnect()
                    if not isinstance(exc, OSError | Disconnect):
                        log.exception("%s: worker failed", self.peer)
                    self.stop_reading()
            finally:
                self._return(pages)
                assert self._slots is not None
                self._slots.release()
                self._inflight_add(-1)

    def _drain_workers(self) -> None:
        if not self._workers:
            return
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0)

    def _stop_workers(self) -> None:
        if not self._workers:
            return
        self._drain_workers()
        for _ in self._workers:
            self._work.put(None)
        for t in self._workers:
            t.join()
        self._workers.clear()
