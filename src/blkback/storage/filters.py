"""Filters that wrap any storage, after nbdkit's delay, rate and error filters.

They emulate the slow network-backed volumes of the seed experiment (about 40 MB/s and a
few ms per request) in front of a local ``memory:``, ``null:`` or ``file:`` backend, and
inject faults for tests. Every filter passes the inner storage's size and capabilities
through unchanged, and sets ``inline = False``: a filter may wait, so the server must not
run it on the connection thread.

Each request passes :meth:`StorageFilter.admit` with its operation name, offset and length
before it reaches the inner storage; a filter only overrides that hook.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Collection
from typing import Final

from blkback.clock import NS_PER_S, Clock, MonotonicClock
from blkback.errors import StorageIOError

from .base import DirectAccess, Storage, buffers_length, format_size

#: Operation names, as used by ``error-ops`` and :meth:`StorageFilter.admit`.
OPS: Final = ("read", "write", "trim", "zero", "flush", "cache", "extents")


class StorageFilter:
    """A storage that forwards every call to ``inner`` after :meth:`admit`."""

    name = "filter"

    def __init__(self, inner: Storage) -> None:
        """Wrap ``inner``, copying its size and capabilities.

        Args:
            inner: The storage (or filter) below this one.
        """
        self.inner = inner
        self.size = inner.size
        self.readonly = inner.readonly
        self.can_flush = inner.can_flush
        self.can_fua = inner.can_fua
        self.can_trim = inner.can_trim
        self.can_zero = inner.can_zero
        self.can_fast_zero = inner.can_fast_zero
        self.can_cache = inner.can_cache
        self.can_extents = inner.can_extents
        self.can_multi_conn = inner.can_multi_conn
        self.inline = False

    def direct_access(self) -> DirectAccess | None:
        """Never: every request must pass :meth:`admit`."""
        return None

    def admit(self, op: str, offset: int, length: int) -> None:
        """Called before each request reaches ``inner``; may sleep or raise.

        Args:
            op: One of :data:`OPS`.
            offset: First byte (0 for flush).
            length: Bytes concerned (0 for flush).
        """

    def preadv(self, bufs: list[memoryview], offset: int) -> None:
        """Admit, then read from ``inner``."""
        self.admit("read", offset, buffers_length(bufs))
        self.inner.preadv(bufs, offset)

    def pwritev(self, bufs: list[memoryview], offset: int, fua: bool) -> None:
        """Admit, then write to ``inner``."""
        self.admit("write", offset, buffers_length(bufs))
        self.inner.pwritev(bufs, offset, fua)

    def flush(self) -> None:
        """Admit, then flush ``inner``."""
        self.admit("flush", 0, 0)
        self.inner.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Admit, then trim ``inner``."""
        self.admit("trim", offset, length)
        self.inner.trim(offset, length, fua)

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool, fua: bool) -> None:
        """Admit, then zero ``inner``."""
        self.admit("zero", offset, length)
        self.inner.zero(offset, length, may_trim=may_trim, fast_only=fast_only, fua=fua)

    def cache(self, offset: int, length: int) -> None:
        """Admit, then pass the hint to ``inner``."""
        self.admit("cache", offset, length)
        self.inner.cache(offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Admit, then ask ``inner``."""
        self.admit("extents", offset, length)
        return self.inner.extents(offset, length)

    def close(self) -> None:
        """Close ``inner``."""
        self.inner.close()

    def describe_self(self) -> str:
        """This layer alone, e.g. ``delay(read=10ms, write=10ms)``."""
        return self.name

    def __repr__(self) -> str:
        return f"{self.describe_self()} > {self.inner!r}"


def format_seconds(seconds: float) -> str:
    """``0.01`` → ``10ms``; ``1.5`` → ``1.5s``; ``2e-05`` → ``20us``."""
    if seconds >= 1 or seconds == 0:
        return f"{seconds:g}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:g}ms"
    return f"{seconds * 1e6:g}us"


class DelayFilter(StorageFilter):
    """Sleep before each request: a fixed per-request latency, like a network round trip.

    ``read_s`` applies to read and cache, ``write_s`` to write, trim, zero and flush.
    Extents are not delayed (it is metadata the client asks for while planning).
    The sleep happens in the calling thread, so concurrent requests overlap their delays,
    as requests in flight to a remote volume do.
    """

    name = "delay"

    def __init__(
        self, inner: Storage, *, read_ns: int, write_ns: int, clock: Clock | None = None
    ) -> None:
        """Set the delays.

        Args:
            inner: The storage below.
            read_ns: Nanoseconds before each read or cache.
            write_ns: Nanoseconds before each write, trim, zero or flush.
            clock: The clock to wait on (default: the real one).
        """
        super().__init__(inner)
        self.read_ns = read_ns
        self.write_ns = write_ns
        self._clock: Clock = clock or MonotonicClock()

    def admit(self, op: str, offset: int, length: int) -> None:
        """Wait for this operation's delay."""
        if op in ("read", "cache"):
            delay_ns = self.read_ns
        elif op == "extents":
            return
        else:
            delay_ns = self.write_ns
        if delay_ns > 0:
            clock = self._clock
            clock.wait_until(clock.now_ns() + delay_ns)

    def describe_self(self) -> str:
        """E.g. ``delay(read=10ms, write=10ms)``."""
        read = format_seconds(self.read_ns / NS_PER_S)
        write = format_seconds(self.write_ns / NS_PER_S)
        return f"delay(read={read}, write={write})"


class RateFilter(StorageFilter):
    """Limit read plus write bandwidth with one token bucket shared by all callers.

    The bucket holds at most ``burst`` bytes and refills at ``rate`` bytes per second. A
    request takes its length from the bucket at once, even into debt, and then sleeps until
    the debt would be repaid: the lock is held only for that arithmetic, never while
    sleeping, and a later request inherits the debt of earlier ones, so concurrent callers
    are served in arrival order and together never exceed ``rate`` (beyond ``burst``).
    Only read and write move data; other requests pass freely.
    """

    name = "rate"

    def __init__(
        self,
        inner: Storage,
        *,
        rate: int,
        burst: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        """Set the rate.

        Args:
            inner: The storage below.
            rate: Bytes per second (> 0).
            burst: Bucket capacity in bytes; default a tenth of a second of ``rate`` (at
                least 64 KiB), so short bursts are not flattened into a trickle.
            clock: The clock to read and wait on (default: the real one).
        """
        super().__init__(inner)
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate // 10, 64 * 1024)
        self._clock: Clock = clock or MonotonicClock()
        self._lock = threading.Lock()
        self._tokens = float(self.burst)  # start full: the first burst passes at once
        self._last_ns = self._clock.now_ns()
        self.bytes_admitted = 0

    def reserve(self, nbytes: int) -> int:
        """Take ``nbytes`` from the bucket; return the instant (ns) the caller may go on."""
        with self._lock:
            now = self._clock.now_ns()
            refill = (now - self._last_ns) * self.rate / NS_PER_S
            self._tokens = min(float(self.burst), self._tokens + refill)
            self._last_ns = now
            self._tokens -= nbytes
            self.bytes_admitted += nbytes
            debt = -self._tokens
        return now + math.ceil(debt * NS_PER_S / self.rate) if debt > 0 else now

    def admit(self, op: str, offset: int, length: int) -> None:
        """Wait until the bucket allows ``length`` bytes of a read or write."""
        if op not in ("read", "write") or length <= 0:
            return
        self._clock.wait_until(self.reserve(length))

    def describe_self(self) -> str:
        """E.g. ``rate(40 MiB/s, burst 4 MiB)``."""
        return f"rate({format_size(self.rate)}/s, burst {format_size(self.burst)})"


class ErrorFilter(StorageFilter):
    """Fail requests with EIO: at random, in a byte range, for chosen operations.

    A request fails when its operation is in ``ops``, it touches ``error_range`` (if one is
    set; a flush touches no range, so it never fails when a range is set) and a draw from
    ``random.Random(seed)`` falls below ``probability``. The failure happens before the
    inner storage is called, so a failed write changes nothing. One generator serves all
    threads (under a lock): a single-threaded run replays exactly from its seed.
    """

    name = "error"

    def __init__(
        self,
        inner: Storage,
        *,
        probability: float = 1.0,
        error_range: tuple[int, int] | None = None,
        ops: Collection[str] = OPS,
        seed: int = 0,
    ) -> None:
        """Configure the faults.

        Args:
            inner: The storage below.
            probability: Chance in [0, 1] that a matching request fails.
            error_range: ``(start, end)`` bytes, end exclusive, or None for everywhere.
            ops: Operations that may fail (names from :data:`OPS`).
            seed: Seed of the random generator.
        """
        super().__init__(inner)
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be in [0, 1]")
        unknown = set(ops) - set(OPS)
        if unknown:
            raise ValueError(f"unknown operations {sorted(unknown)}")
        self.probability = probability
        self.error_range = error_range
        self.ops = frozenset(ops)
        self.seed = seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected = 0

    def admit(self, op: str, offset: int, length: int) -> None:
        """Raise :class:`StorageIOError` if this request is chosen to fail."""
        if op not in self.ops:
            return
        if self.error_range is not None:
            start, end = self.error_range
            if op == "flush" or not (offset < end and start < offset + max(length, 1)):
                return
        with self._lock:
            # Draw even when probability is 1, so the sequence does not depend on it.
            hit = self._rng.random() < self.probability
            if hit:
                self.injected += 1
        if hit:
            raise StorageIOError(f"{op} at {offset}: injected error (error filter)")

    def describe_self(self) -> str:
        """E.g. ``error(p=0.01, range=0-4096, ops=read,write, seed=0)``."""
        parts = [f"p={self.probability:g}"]
        if self.error_range is not None:
            parts.append(f"range={self.error_range[0]}-{self.error_range[1]}")
        if self.ops != frozenset(OPS):
            parts.append("ops=" + "+".join(o for o in OPS if o in self.ops))
        parts.append(f"seed={self.seed}")
        return f"error({', '.join(parts)})"
