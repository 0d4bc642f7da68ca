"""One NBD connection = one ring: handshake, then the ring's loop, on one OS thread.

The loop is ``xen_blkif_schedule`` in userspace:

1. wait for requests in a blocking ``recv_into``, at most until the ring's next pass is due:
   the socket's ``SO_RCVTIMEO`` is the kernel's ``wait_event_interruptible_timeout``, so the
   hot path costs one syscall per batch and no ``poll``;
2. take every complete request already received (batched parsing), give each the pages of
   its payload from the ring's pool, do its I/O straight into or out of those pages, and send
   all replies of the batch with one gathered write (``writev``, or ``sendmsg``);
3. put the pages back into the pool; once no request is waiting (the kernel's
   ``do_block_io_op`` drains its ring: here the staging buffer, and after a large write
   received into its pages the socket too), run the loop pass, which trims the pool to
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
import functools
import logging
import os
import queue
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, final

from librt.threading import Lock

from blkback.clock import NS_PER_MS, NS_PER_S, NS_PER_US, thread_cpu_ns
from blkback.core.pages import PAGE_SHIFT, PAGE_SIZE, MmapAllocator
from blkback.core.polling import PollWindow
from blkback.core.ring import Ring
from blkback.errors import ProtocolError, RequestError
from blkback.protocol.constants import REQUEST_MAGIC, Cmd, CmdFlag, TFlag
from blkback.protocol.handshake import HandshakeState, Negotiated, ServerHandshake
from blkback.protocol.transmission import REQUEST, REQUEST_SIZE, Transmission
from blkback.server import oplog
from blkback.server.direct_io import direct_io
from blkback.server.tls import TlsSocket, start_tls
from blkback.storage.direct import DirectIO

if TYPE_CHECKING:
    from blkback.clock import Clock
    from blkback.core.params import Params
    from blkback.server.exports import Catalog, Export
    from blkback.server.settings import ServerConfig

log = logging.getLogger("blkback.connection")

STAGING_BYTES: Final = 256 * 1024
GROUP_PAGES: Final = 64  # a group of fast requests takes at most about this many pages
# ... and ends after this many pages of write payload, so that a client that sent a burst of
# writes hears back while the ring copies the rest (docs/data-path.md §7).
WRITE_GROUP_PAGES: Final = 4
LARGE_PAYLOAD: Final = 64 * 1024  # a write this large is received straight into its pages
# A write this large on a plain socket is stored by the ring's store worker while the ring
# receives the next request (_hand_over_write; docs/data-path.md §8) ...
ASYNC_WRITE: Final = 256 * 1024
# ... which holds at most this many of them (stored or waiting): their pages are in flight.
STORES_IN_FLIGHT: Final = 2
PAGE_SIZE_MASK: Final = PAGE_SIZE - 1
IOV_MAX: Final = 1024
MSG_DONTWAIT: Final = socket.MSG_DONTWAIT
MAX_SEND_BYTES: Final = 1 << 30

C_READ: Final = int(Cmd.READ)
C_WRITE: Final = int(Cmd.WRITE)
C_DISC: Final = int(Cmd.DISC)
C_FLUSH: Final = int(Cmd.FLUSH)
C_TRIM: Final = int(Cmd.TRIM)
C_CACHE: Final = int(Cmd.CACHE)
C_ZEROES: Final = int(Cmd.WRITE_ZEROES)
C_BLOCK_STATUS: Final = int(Cmd.BLOCK_STATUS)
F_FUA: Final = int(CmdFlag.FUA)
F_NO_HOLE: Final = int(CmdFlag.NO_HOLE)
F_FAST_ZERO: Final = int(CmdFlag.FAST_ZERO)
F_REQ_ONE: Final = int(CmdFlag.REQ_ONE)

_UNPACK_REQUEST: Final = REQUEST.unpack_from


@final
class _Request:
    """A fast-path request of a group: a READ or WRITE without flags, inside the export."""

    # A compiled class, not a tuple: its integer fields are stored unboxed (a tuple boxes
    # the cookie, offset and length of every request anew).
    __slots__ = ("cmd", "cookie", "length", "npages", "offset")

    def __init__(self, cmd: int, cookie: int, offset: int, length: int, npages: int) -> None:
        self.cmd = cmd
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.npages = npages


_Replies = list[bytes | memoryview]
_NO_GROUP: Final[tuple[list[_Request], int]] = ([], 0)


def unsent_tail(bufs: list[bytes | memoryview], sent: int) -> list[bytes | memoryview]:
    """``bufs`` without their first ``sent`` bytes (fewer than they hold): what a partial
    write left to send."""
    k = 0
    while sent >= len(bufs[k]):
        sent -= len(bufs[k])
        k += 1
    if sent:
        return [memoryview(bufs[k])[sent:], *bufs[k + 1 :]]
    return bufs[k:]


def _wants_tls(hs: ServerHandshake) -> bool:
    return hs.state is HandshakeState.START_TLS


class RingHost(Protocol):
    """What a connection needs of the server that accepted it (``Server`` is one).

    Declared here, beside its user, so that the connection does not import the server that
    creates it: the settings, the exports, the ring's attachment to its device, the polling
    slots, and the server's table of connections.
    """

    config: ServerConfig
    params: Params
    clock: Clock
    catalog: Catalog
    poll_slots: list[Lock]
    connections: set[Connection]

    @property
    def stopping(self) -> bool: ...

    def attach_ring(self, conn: Connection, export: Export) -> Ring: ...

    def detach_ring(self, conn: Connection) -> None: ...

    def connection_closed(self, conn: Connection) -> None: ...

    def warn_once(self, message: str) -> None: ...


class Disconnect(Exception):  # noqa: N818 (control flow, not an error)
    """The client asked to disconnect, or went away."""


class Connection:
    """Serves one client socket until it disconnects or the server stops."""

    def __init__(self, server: RingHost, sock: socket.socket, peer: str) -> None:
        self.server = server
        # After STARTTLS this is a TlsSocket: the same calls, over TLS (see server/tls.py).
        self.sock: socket.socket | TlsSocket = sock
        self.peer = peer
        # The server's polling slots and connection table, held here: the server object is
        # not compiled, and each batch reads both (:meth:`_busy_poll`).
        self._poll_slots = server.poll_slots
        self._connections = server.connections
        self.ring: Ring | None = None
        self.export: Export | None = None
        self.trace = False  # -vv: log every request (and serve all by the general path)
        self.allocator: MmapAllocator | None = None
        # Taken by every send once workers exist (a store worker starts with the first large
        # write): mypyc's lock, as the ring lock below.
        self.send_lock = Lock()
        # mypyc's runtime lock: compiled, its acquire and release are direct C calls, where
        # a threading.Lock's acquire parses its arguments on every call (the hot path takes
        # the ring lock three times per batch; docs/data-path.md section 6).
        self.ring_lock = Lock()
        self.thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._work: queue.SimpleQueue[tuple[int, int, int, int, int, list[int]] | None] = (
            queue.SimpleQueue()
        )
        # A token per request the workers may hold (see _start_workers): a C queue, whose
        # get and put cost the ring no Python frame, where a Semaphore's run interpreted.
        self._slots: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._slot_count = 0
        self._fatal: BaseException | None = None
        self.max_payload = 0
        # Pages per group of fast requests (see _loop): one pool call and one gathered write
        # per group. 1 serves request by request (for comparisons).
        self.group_pages = max(1, int(os.environ.get("BLKBACK_GROUP_PAGES", str(GROUP_PAGES))))
        self.write_group_pages = max(
            1, int(os.environ.get("BLKBACK_WRITE_GROUP_PAGES", str(WRITE_GROUP_PAGES)))
        )
        self.closed = threading.Event()
        self._alloc_failed_ns = -(10**18)  # last page allocation failure
        self._alloc_backoff_ns = 0
        self.direct: DirectIO | None = None  # the fast path's I/O, if the storage has one
        # The ring loop's state between its steps.
        self._staging = bytearray(STAGING_BYTES)
        self._view = memoryview(self._staging)
        self._first_header = self._view[:REQUEST_SIZE]
        self._small_recv = False  # receive the next header alone (after a large payload)
        self._served = False  # a batch was just served: busy-poll before sleeping
        self._now_ns = server.clock.now_ns
        self._last_request_ns = self._now_ns()
        self._recv_into: Callable[[memoryview], int] = sock.recv_into
        self._send_one: Callable[[bytes | memoryview], int] = sock.send
        self._send_many: Callable[[list[bytes | memoryview]], int] = sock.sendmsg
        # Busy polling (see _busy_poll): the ring's adaptive window, if it may poll, and a
        # poll on the socket alone to spin with.
        self._window: PollWindow | None = None
        self._readable: Callable[[int], list[tuple[int, int]]] | None = None
        self._window_pending = False  # the window ran out: the next receive tells by how much
        # A receive that never waits (MSG_DONTWAIT), on a plain socket only: the batch's
        # drain and the busy poll take what is there now.
        self._recv_now: Callable[[memoryview, int, int], int] | None = None
        # Resting (see _rest): a poll on the socket and this eventfd, which nudge() writes.
        self._rest_poller: select.poll | None = None
        self._wake_fd = -1
        self._wake_lock = threading.Lock()

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Run the connection on its own thread."""
        self.thread = threading.Thread(target=self.run, name=f"ring-{self.peer}", daemon=True)
        self.thread.start()

    def wake_pass(self) -> None:
        """Run the ring's loop pass now, on the calling thread (a squeeze began).

        The ring's own thread is nudged too: while the squeeze lasts it keeps timed passes.
        """
        ring = self.ring
        if ring is None:
            return
        with self.ring_lock:
            if not ring.closed:
                at = ring.wake_ns if ring.wake_ns is not None else self.server.clock.now_ns()
                ring.loop_pass(at, had_io=False, woken=True)
        self.nudge()

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
            with self._wake_lock:
                if self._wake_fd >= 0:
                    os.close(self._wake_fd)
                    self._wake_fd = -1
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
        deadline_ns = clock.now_ns() + server.config.handshake_timeout_ns
        while hs.state is HandshakeState.IN_PROGRESS:
            try:
                left_s = (deadline_ns - clock.now_ns()) / NS_PER_S
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
                left_s = max(0.001, (deadline_ns - clock.now_ns()) / NS_PER_S)
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
        self.contexts = sorted(neg.meta_contexts)
        self.max_payload = self.codec.max_write_payload
        self.export_size = neg.export.size
        self.max_block = neg.export.max_block
        self.writable = not neg.tflags & TFlag.READ_ONLY
        self.allocator = MmapAllocator(
            chunk_pages=server.config.chunk_pages,
            mlock=server.config.mlock,
            warn=server.warn_once,
        )
        self.ring = server.attach_ring(self, export)
        self.ring.waker = self.wake_pass
        oplog.connected(self.peer, neg)
        self.trace = oplog.tracing()
        # Tracing logs every request: then every request takes the general path.
        self.direct = None if self.trace else direct_io(self.storage)
        if not self.storage.inline:
            self._start_workers(server.config.workers, server.config.max_requests_per_ring)
        self._bind_socket(self.sock)
        self._set_send_timeout()
        self._set_recv_timeout(server.params.lru_interval_ms * NS_PER_MS)
        self._loop(leftover)

    def _bind_socket(self, sock: socket.socket | TlsSocket) -> None:
        """Make the (possibly TLS) socket blocking and set up the receive, poll and rest."""
        sock.settimeout(None)  # blocking; waits are bounded by SO_RCVTIMEO
        self._recv_into = sock.recv_into
        self._send_one = sock.send
        self._send_many = sock.sendmsg
        if not isinstance(sock, socket.socket):
            return  # TLS may hold decrypted bytes a poll cannot see: it keeps timed passes
        if not self._workers:
            # The ring's thread sends, and its store worker once started; the socket closes
            # only after that worker has been joined (_close): replies go to the descriptor,
            # with os.write/os.writev, which cost ~360/~950 instructions less per call than
            # socket.send/sendmsg (docs/data-path.md §6).
            fd = sock.fileno()
            self._send_one = functools.partial(os.write, fd)
            self._send_many = functools.partial(os.writev, fd)
        self._recv_now = sock.recv_into  # a batch's drain, a busy poll's receive
        if self.direct is not None:
            # Busy polling needs the plain socket (a TLS socket may hold decrypted bytes),
            # and only a ring that serves inline polls (a ring with workers would take the
            # GIL from its own workers).
            max_ns = self.server.config.poll_ns
            if max_ns:
                self._window = PollWindow(max_ns)
                spin_poller = select.poll()
                spin_poller.register(sock.fileno(), select.POLLIN)
                self._readable = spin_poller.poll
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        poller.register(self._wake_fd, select.POLLIN)
        self._rest_poller = poller

    def _set_recv_timeout(self, recv_ns: int) -> None:
        """Bound the ring's blocking ``recv`` (the kernel's wait with ``LRU_INTERVAL``)."""
        recv_us = max(1000, recv_ns // NS_PER_US)
        tv = struct.pack("ll", recv_us // 1_000_000, recv_us % 1_000_000)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)

    def _set_send_timeout(self) -> None:
        send_us = self.server.config.io_timeout_ns // NS_PER_US
        tv = struct.pack("ll", send_us // 1_000_000, send_us % 1_000_000)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    def _loop(self, leftover: bytes) -> None:
        """The ring's loop (``xen_blkif_schedule``): receive, serve the batch, pass; repeat.

        A *batch* is every complete request in the staging buffer. Its common requests (READ
        and WRITE without flags, inside the export, on a storage with direct access served
        inline) are served in *groups*: the requests at the front of the staging buffer, up
        to ``group_pages`` pages, take their pages from the pool in one call, do their I/O,
        send their replies in one gathered write and give the pages back in one call. A group is
        what one pass of the kernel's ``do_block_io_op`` maps at once; 16 random 4 KiB
        requests are one group, a 1 MiB request is a group of its own (so that a stream of
        large requests reuses the same pages and the pool stays small). Anything else goes
        one request at a time through ``Transmission.check`` and ``_execute``.
        """
        self._staging[: len(leftover)] = leftover
        start, end = 0, len(leftover)
        # Methods called on self, not bound to locals: compiled, these are direct calls.
        while True:
            if self._fatal is not None:
                raise self._fatal
            if end - start < REQUEST_SIZE:
                start, end = self._receive(start, end)
            else:
                start, end = self._serve_batch(start, end)
                self._pass_after_batch()

    # -- step 1: receive ------------------------------------------------------------------
    def _receive(self, start: int, end: int) -> tuple[int, int]:
        """Wait for more request bytes; return the new staging ``(start, end)``.

        The partial header left at ``start`` moves to the front first (:meth:`_compact`).
        When the wait ends with no data (the ring was idle until its pass was due),
        :meth:`_receive_timed_out` runs.
        """
        start, end = self._compact(start, end)
        # After a large write received straight into its pages, receive the next header
        # alone rather than a staging buffer's worth of the next payload, which would then
        # be copied once more.
        dst = self._header_space(end) if self._small_recv else self._staging_space(end)
        n = self._busy_poll(dst) if self._served else -1
        self._served = False
        if n < 0:
            try:
                n = self._recv_into(dst)
            except BlockingIOError:
                if self._window_pending:
                    self._window_ran_out(idle=True)
                self._receive_timed_out()
                return start, end
            if self._window_pending:
                self._window_ran_out(idle=False)
        if n == 0:
            raise Disconnect
        self._small_recv = False
        return start, end + n

    def _staging_space(self, end: int) -> memoryview:
        """The staging buffer after its first ``end`` bytes."""
        # Empty (usual: a batch consumes what it received), it is the view made once: no
        # slice object per receive.
        return self._view[end:] if end else self._view

    def _header_space(self, end: int) -> memoryview:
        """The rest of one request header after the first ``end`` staged bytes."""
        return self._view[end:REQUEST_SIZE] if end else self._first_header

    def _compact(self, start: int, end: int) -> tuple[int, int]:
        """Move the staged bytes (a partial header) to the front; the new ``(start, end)``."""
        if start and end > start:
            self._staging[: end - start] = self._view[start:end]
        return 0, end - start

    def _busy_poll(self, dst: memoryview) -> int:
        """Poll the socket right after a batch, before sleeping in ``recv``; -1: no data.

        The ring spins for its :class:`PollWindow` (at most ``ServerConfig.poll_ns``), which
        starts at 0 and grows only while requests come soon after a batch, and only while
        spinning costs the ring no more CPU nor wall time per batch than sleeping (measured
        in epochs). Only rings that serve inline poll, at most one per polling slot, and
        only while the server has no more connections than slots. A window that ran out (0
        included) leaves ``_window_pending``: the receive that follows measures the gap.
        """
        window = self._window
        slots = self._poll_slots
        if window is None or len(self._connections) > len(slots):
            return -1
        if window.batch_served():
            ring = self.ring
            assert ring is not None
            window.epoch_over(thread_cpu_ns(), self._now_ns(), ring.stats.requests())
        if not window.spinning:
            return -1
        poll_ns = window.window_ns
        if not poll_ns:
            self._window_pending = True
            return -1
        for slot in slots:
            if slot.acquire(False):
                try:
                    n = self._spin(dst, poll_ns)
                finally:
                    slot.release()
                self._window_pending = n < 0
                return n
        return -1  # every slot is taken: this gap says nothing about the window

    def _spin(self, dst: memoryview, poll_ns: int) -> int:
        """Spin until the socket is readable, then receive; -1 if ``poll_ns`` ran out.

        A ``poll`` with no timeout costs about a third of a ``recv`` that raises
        ``BlockingIOError`` (0.29 against 1.0 us here), so the spin notices sooner.
        """
        ring = self.ring
        readable = self._readable
        recv = self._recv_now
        assert ring is not None and readable is not None and recv is not None
        now_ns = self._now_ns
        stats = ring.stats
        stats.polls += 1
        begin = now_ns()
        deadline = begin + poll_ns
        while not readable(0):
            now = now_ns()
            if now >= deadline:
                stats.polled_ns += now - begin
                return -1
        stats.polled_ns += now_ns() - begin
        stats.poll_hits += 1
        try:
            return recv(dst, 0, MSG_DONTWAIT)
        except BlockingIOError:
            return -1  # readable, yet nothing to read

    def _window_ran_out(self, *, idle: bool) -> None:
        """The receive after a window that ran out returned: grow or shrink the window."""
        self._window_pending = False
        window = self._window
        assert window is not None
        if idle:
            window.idle()
        else:
            window.slept(self._now_ns() - self._last_request_ns)

    def _receive_timed_out(self) -> None:
        """The ring's receive timed out: run its pass if due, then rest if it may.

        A ring at rest (:meth:`Ring.at_rest`: pool at its target, no squeeze pending, the
        default wake-up mode) needs no timed pass: it sleeps until the client sends or
        :meth:`nudge` says a squeeze or a parameter change needs it.
        """
        server = self.server
        ring = self.ring
        assert ring is not None
        if server.stopping:
            raise Disconnect
        now = self._now_ns()
        timeout_ns = server.config.idle_timeout_ns
        if timeout_ns and now - self._last_request_ns > timeout_ns:
            log.info("%s: idle timeout", self.peer)
            raise Disconnect
        if ring.pass_due(now):
            self._pass(now, had_io=False, woken=False)
        if self._rest_poller is not None:
            with self.ring_lock:
                resting = ring.at_rest(now)
            if resting:
                self._rest()
                # Awake again (the client sent, or a nudge ran the pass): the next timed
                # pass is a whole interval away; a batch runs its own pass anyway.
                self._set_recv_timeout(server.params.lru_interval_ms * NS_PER_MS)
                return
        self._set_recv_timeout(ring.next_pass_ns() - now)

    def _rest(self) -> None:
        """Sleep with no timer until the socket is readable or the ring is nudged.

        A nudge (a squeeze began, a parameter changed) runs a pass at once: the pool state is
        then what the kernel's next timed pass would leave. The receive that follows finds
        the client's bytes, or times out as usual and decides again whether to rest.
        """
        poller = self._rest_poller
        assert poller is not None
        timeout_ns = self.server.config.idle_timeout_ns
        wait_ms = -1
        if timeout_ns:
            left_ns = self._last_request_ns + timeout_ns - self._now_ns()
            wait_ms = max(1, left_ns // NS_PER_MS + 1)
        ring = self.ring
        assert ring is not None
        ring.stats.rests += 1
        nudged = False
        for fd, _ in poller.poll(wait_ms):
            if fd == self._wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)
                nudged = True
        if nudged:
            self._pass(self._now_ns(), had_io=False, woken=False)

    def nudge(self) -> None:
        """Wake a resting ring (a parameter changed, or a squeeze began): callable anywhere."""
        with self._wake_lock:
            if self._wake_fd >= 0:
                with contextlib.suppress(OSError):  # the counter is full: it is awake anyway
                    os.eventfd_write(self._wake_fd, 1)

    # -- step 2: serve a batch ------------------------------------------------------------
    def _serve_batch(self, start: int, end: int) -> tuple[int, int]:
        """Serve requests until none is waiting; return the new staging ``(start, end)``.

        The kernel's ``do_block_io_op`` consumes the ring until it is empty, and only then
        does ``xen_blkif_schedule`` run its pass. Here a batch is every complete request in
        the staging buffer and, after a large write received straight into its pages (which
        leaves the buffer empty), every request already in the socket
        (:meth:`_receive_waiting`): a stream of 1 MiB writes then runs one pass per drain,
        not one per request, which with ``max_buffer_pages=0`` is one ``MADV_FREE`` of 256
        pages per request.
        """
        now = self._now_ns()
        while True:
            start, end = self._serve_staged(start, end, now)
            if not self._small_recv:
                return start, end
            now = self._now_ns()
            start, end = self._receive_waiting(start, end, now)
            if end - start < REQUEST_SIZE:
                return start, end

    def _receive_waiting(self, start: int, end: int, now_ns: int) -> tuple[int, int]:
        """The next request header if it is in the socket already (no wait); new ``(start, end)``.

        The drain ends (the staging buffer stays short of a header) when nothing is waiting,
        on TLS (whose socket may hold decrypted bytes no flag reaches), or when the ring's
        timed pass is due: a client that never lets the socket run dry still gets its pass
        every ``lru_interval_ms``.
        """
        ring = self.ring
        assert ring is not None
        recv = self._recv_now
        if recv is None or ring.pass_due(now_ns):
            return start, end
        start, end = self._compact(start, end)
        try:
            n = recv(self._header_space(end), 0, MSG_DONTWAIT)
        except BlockingIOError:
            return start, end
        # 0 is end-of-file: the receive step sees it again and ends the connection. A part
        # of a header leaves the rest of it to the receive step, alone as before.
        end += n
        self._small_recv = end < REQUEST_SIZE
        return start, end

    def _serve_staged(self, start: int, end: int, now: int) -> tuple[int, int]:
        """Serve every complete request in the staging buffer; return the new ``(start, end)``."""
        view = self._view
        while end - start >= REQUEST_SIZE:
            group, need = self._parse_group(start, end) if self.direct else _NO_GROUP
            if not group:
                start, end = self._one_request(view, start, end)
                continue
            pages = self._get_pages(need, now)
            if pages is None:
                # Serve the first request alone: it gets pages or its ENOMEM reply.
                start, end = self._one_request(view, start, end)
                continue
            if self._stored_apart(group):
                start, end = self._hand_over_write(group[0], pages, start, end)
                continue
            try:
                start, end = self._serve_group(group, pages, start, end)
            finally:
                # Their data is out (or the connection failed: nothing else holds them).
                self._put_back(pages)
        return start, end

    def _parse_group(self, start: int, end: int) -> tuple[list[_Request], int]:
        """The group at ``start`` and the pages it needs.

        Fast requests whose headers (and write payloads) are staged, up to ``group_pages``
        pages in all and ``write_group_pages`` pages of writes; a write whose payload is
        still arriving ends it, and so does any request the fast path does not take.
        """
        view = self._view
        group_pages = self.group_pages
        write_group_pages = self.write_group_pages
        max_block = self.max_block
        size = self.export_size
        writable = self.writable
        group: list[_Request] = []
        need = 0
        write_pages = 0
        pos = start
        # Declared ints: compiled, the fields are unboxed once, then compared natively.
        magic: int
        flags: int
        cmd: int
        cookie: int
        offset: int
        length: int
        while need < group_pages and end - pos >= REQUEST_SIZE:
            magic, flags, cmd, cookie, offset, length = _UNPACK_REQUEST(view, pos)
            if magic != REQUEST_MAGIC or flags or not 0 < length <= max_block:
                break
            if offset + length > size:
                break
            npages = (length + PAGE_SIZE_MASK) >> PAGE_SHIFT
            if cmd == C_READ:
                pos += REQUEST_SIZE
            elif cmd == C_WRITE and writable:
                pos += REQUEST_SIZE + length
                write_pages += npages
            else:
                break
            group.append(_Request(cmd, cookie, offset, length, npages))
            need += npages
            if pos >= end or write_pages >= write_group_pages:
                break
        return group, need

    def _stored_apart(self, group: list[_Request]) -> bool:
        """Whether ``group`` is one large write for the store worker (:meth:`_hand_over_write`).

        Only on a plain socket: a TLS socket must not send on one thread while it receives on
        another.
        """
        if len(group) != 1 or self._recv_now is None:
            return False
        req = group[0]
        return req.cmd == C_WRITE and req.length >= ASYNC_WRITE

    def _hand_over_write(
        self, req: _Request, pages: list[int], start: int, end: int
    ) -> tuple[int, int]:
        """Receive a large write's payload, then leave its store and reply to the store worker.

        As ``xen-blkback`` submits a request's bio and goes on with the ring, the ring
        receives the next request while the worker copies this one (with the GIL released:
        ``MemoryRegion``'s large copies, a descriptor's ``pwritev``); a client whose send
        buffer holds a fraction of a payload keeps sending meanwhile. The pages stay in
        flight, out of the pool, until the worker has replied and puts them back.
        """
        try:
            start, end = self._take_payload(
                start + REQUEST_SIZE, end, req.length, self._views(pages, req.length)
            )
        except BaseException:
            self._put_back(pages)
            raise
        if not self._workers:
            self._start_workers(1, STORES_IN_FLIGHT)
        self._submit((0, C_WRITE, req.cookie, req.offset, req.length, pages))
        return start, end

    # -- step 3: get pages ----------------------------------------------------------------
    def _get_pages(self, n: int, now_ns: int) -> list[int] | None:
        """``n`` pages from the ring's pool in one call; None if the pool cannot grow."""
        ring = self.ring
        assert ring is not None
        self.ring_lock.acquire()
        try:
            return ring.get_pages(n, now_ns)
        except MemoryError:
            return None
        finally:
            self.ring_lock.release()

    # -- step 4: do the I/O, and reply ----------------------------------------------------
    def _serve_group(
        self, group: list[_Request], pages: list[int], start: int, end: int
    ) -> tuple[int, int]:
        """Do the group's I/O in order and send its replies in one gathered write.

        A request whose storage I/O fails gets its error reply in its place.
        """
        ring = self.ring
        alloc = self.allocator
        direct = self.direct
        assert ring is not None and alloc is not None and direct is not None
        page_views = alloc.page_views
        codec = self.codec
        out: _Replies = []
        out_bytes = 0  # the replies' length, counted as they are built: the send measures none
        reads = writes = read_bytes = write_bytes = 0
        j = 0
        for req in group:
            cmd = req.cmd
            cookie = req.cookie
            offset = req.offset
            length = req.length
            npages = req.npages
            start += REQUEST_SIZE
            if npages == 1:  # the common 4 KiB request: no span machinery
                v = page_views[pages[j]]
                views = [v if length == PAGE_SIZE else v[:length]]
            else:  # a request alone in its group (a 1 MiB one) spans the group's own list
                views = alloc.spans(
                    pages if npages == len(pages) else pages[j : j + npages], length
                )
            j += npages
            try:
                if cmd == C_READ:
                    direct.read(views, offset, length)
                    reply = codec.read_reply_header(cookie, offset, length)
                    out.append(reply)
                    out += views
                    out_bytes += length
                    reads += 1
                    read_bytes += length
                else:
                    start, end = self._take_payload(start, end, length, views)
                    direct.write(views, offset, length)
                    reply = codec.ok_reply(cookie)
                    out.append(reply)
                    writes += 1
                    write_bytes += length
            except RequestError as exc:
                reply = self._io_error_reply(cookie, exc)
                out.append(reply)
            out_bytes += len(reply)
        self._send(out, out_bytes)
        stats = ring.stats
        stats.rd_req += reads
        stats.rd_bytes += read_bytes
        stats.wr_req += writes
        stats.wr_bytes += write_bytes
        return start, end

    def _take_payload(
        self, start: int, end: int, length: int, views: list[memoryview]
    ) -> tuple[int, int]:
        """Fill a write's pages with its payload; return the new staging ``(start, end)``.

        A payload staged with the headers is copied once; the rest of a longer one is
        received straight into the pages, which leaves the staging buffer empty.
        """
        staged_whole = end - start >= length
        start = self._receive_payload(self._view, start, end, length, views)
        if staged_whole:
            return start, end
        self._small_recv = length >= LARGE_PAYLOAD
        return start, start

    # -- step 5: put back, and pass -------------------------------------------------------
    def _put_back(self, pages: list[int]) -> None:
        ring = self.ring
        assert ring is not None
        self.ring_lock.acquire()
        try:
            ring.put_pages(pages)
        finally:
            self.ring_lock.release()

    def _pass_after_batch(self) -> None:
        """The loop pass after the I/O: trim, or squeeze."""
        self._served = True
        self._last_request_ns = now = self._now_ns()
        self._pass(now, had_io=True, woken=False)

    def _pass(self, now_ns: int, *, had_io: bool, woken: bool) -> None:
        ring = self.ring
        assert ring is not None
        self.ring_lock.acquire()
        try:
            ring.loop_pass(now_ns, had_io=had_io, woken=woken)
        finally:
            self.ring_lock.release()

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
        cap_ns = self.server.params.lru_interval_ms * NS_PER_MS
        if now - self._alloc_failed_ns > NS_PER_S:
            self._alloc_backoff_ns = NS_PER_MS
        else:
            self._alloc_backoff_ns = min(2 * self._alloc_backoff_ns, cap_ns)
        self._alloc_failed_ns = now
        ring = self.ring
        if ring is not None:
            ring.stats.extra["alloc_backoff_ms"] = (
                ring.stats.extra.get("alloc_backoff_ms", 0) + self._alloc_backoff_ns // NS_PER_MS
            )
        self.server.clock.wait_until(now + self._alloc_backoff_ns)

    def _io_error_reply(self, cookie: int, err: RequestError) -> bytes:
        """The error reply of a fast-path request whose storage I/O failed (counted, logged)."""
        ring = self.ring
        if ring is not None:
            ring.stats.errors += 1
        oplog.error_reply(self.peer, err.errno, str(err))
        return self.codec.error_reply(cookie, err.errno, str(err))

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
            if cmd == C_WRITE:
                start = self._discard_payload(view, start, end, length)
            self._refuse_no_memory(cmd, cookie, out)
            return start, max(end, start)
        self._dispatch((flags, cmd, cookie, offset, length, pages), out, held)
        return start, max(end, start)

    def _refuse_no_memory(self, cmd: int, cookie: int, out: _Replies) -> None:
        """Answer ENOMEM, send the replies so far, then pause the ring (``_alloc_backoff``)."""
        ring = self.ring
        assert ring is not None
        ring.stats.errors += 1
        oplog.error_reply(self.peer, errno.ENOMEM, "out of memory for buffers", cmd)
        out.append(self.codec.error_reply(cookie, errno.ENOMEM, "out of memory for buffers"))
        # The replies so far go out now, not after the pause.
        self._send(out)
        out.clear()
        self._alloc_backoff()

    def _dispatch(
        self, req: tuple[int, int, int, int, int, list[int]], out: _Replies, held: list[int]
    ) -> None:
        """Run an admitted request inline (its reply joins ``out``) or hand it to a worker."""
        if self.storage.inline:
            out.extend(self._execute(*req))
            held.extend(req[5])
            return
        if out:
            self._send(out)
            out.clear()
            self._return(held)
            held.clear()
        self._submit(req)

    def _return(self, pages: list[int]) -> None:
        if pages:
            self._put_back(pages)

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
                return [codec.read_reply_header(cookie, offset, length), *views]
            if cmd == C_WRITE:
                direct = self.direct
                if direct is not None and not flags:  # the codec checked it: no second check
                    direct.write(self._views(pages, length), offset, length)
                else:
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
        is left as it was (the caller writes the same spans to storage next).
        """
        if end - start >= length and len(views) == 1:  # a small write, staged whole
            views[0][:] = view[start : start + length]
            return start + length
        staged = min(end - start, length)
        pos = 0  # bytes of payload in place
        i = 0  # first span not yet full
        filled = 0  # bytes of views[i] in place (the staged part ended inside it)
        while pos < staged:
            v = views[i]
            n = len(v)
            if n <= staged - pos:
                v[:] = view[start + pos : start + pos + n]
                i += 1
            else:
                n = filled = staged - pos
                v[:n] = view[start + pos : start + staged]
            pos += n
        if pos < length:
            rest = views[i:]
            if filled:
                rest[0] = rest[0][filled:]
            self._recv_into_views(rest, length - pos)
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
        last = len(views) - 1
        while got < total:
            try:
                if i == last:  # one span left (a 1 MiB payload is usually one): no iovec
                    n = self._recv_into(views[i])
                else:
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
    def _send(self, bufs: list[bytes | memoryview], total: int = -1) -> None:
        """Send ``bufs`` whole; replies of workers and the ring go out one call at a time.

        ``total`` is their length in bytes when the caller has counted it (a group counts as
        it builds its replies), else -1 and it is counted here.
        """
        if not bufs:
            return
        if total < 0:
            total = sum([len(b) for b in bufs])
        if self._workers:
            with self.send_lock:
                self._send_all(bufs, total)
        else:  # only the ring's thread sends
            self._send_all(bufs, total)

    def _send_all(self, bufs: list[bytes | memoryview], total: int) -> None:
        while True:
            chunk = bufs if len(bufs) <= IOV_MAX else bufs[:IOV_MAX]
            try:
                # One buffer (a write's reply) goes out without an iovec array: ``write`` or
                # ``send`` (see _bind_socket), else ``writev`` or ``sendmsg``.
                sent = self._send_one(chunk[0]) if len(chunk) == 1 else self._send_many(chunk)
            except BlockingIOError:
                raise TimeoutError("client stopped reading replies") from None
            total -= sent
            if total <= 0:
                return  # the usual end: one call took it all, and no buffer was measured
            bufs = unsent_tail(bufs, sent)

    # -- workers (blocking backends; an inline one's large writes) ------------------------
    def _start_workers(self, n: int, in_flight: int) -> None:
        """``n`` worker threads, and at most ``in_flight`` requests handed to them at once."""
        for _ in range(in_flight):
            self._slots.put(None)
        self._slot_count = in_flight
        for i in range(n):
            t = threading.Thread(target=self._worker, name=f"ring-{self.peer}-w{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def _submit(self, req: tuple[int, int, int, int, int, list[int]]) -> None:
        """Hand ``req`` to the workers once a slot is free (waiting counts as ``oo_req``)."""
        try:
            self._slots.get_nowait()
        except queue.Empty:
            ring = self.ring
            assert ring is not None
            ring.stats.oo_req += 1
            self._slots.get()
        self._work.put(req)

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
                self._slots.put(None)

    def _drain_workers(self) -> None:
        if not self._workers:
            return
        # Each request handed over holds a slot until its worker is done: take every slot
        # back, then free them again.
        for _ in range(self._slot_count):
            self._slots.get()
        for _ in range(self._slot_count):
            self._slots.put(None)

    def _stop_workers(self) -> None:
        if not self._workers:
            return
        self._drain_workers()
        for _ in self._workers:
            self._work.put(None)
        for t in self._workers:
            t.join()
        self._workers.clear()
