from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from blkback.clock import NS_PER_MS, NS_PER_S, ManualClock, MonotonicClock
from blkback.errors import StorageIOError
from blkback.storage import (
    DelayFilter,
    ErrorFilter,
    MemoryStorage,
    NullStorage,
    RateFilter,
    open_storage,
)


def buf(n: int) -> list[memoryview]:
    return [memoryview(bytearray(n))]


def test_filters_pass_capabilities_through_and_are_not_inline():
    inner = MemoryStorage(1 << 20)
    st = DelayFilter(inner, read_ns=0, write_ns=0)
    for name in ("size", "readonly", "can_flush", "can_fua", "can_trim", "can_zero"):
        assert getattr(st, name) == getattr(inner, name)
    assert st.can_fast_zero == inner.can_fast_zero
    assert st.can_extents == inner.can_extents
    assert inner.inline
    assert not st.inline
    st.close()


def waited(clock: ManualClock, call: Callable[[], object]) -> int:
    """How long ``call`` waited on ``clock`` (ns)."""
    before = clock.now_ns()
    call()
    return clock.now_ns() - before


def test_delay_per_operation_class():
    clock = ManualClock()
    st = DelayFilter(
        NullStorage(1 << 20), read_ns=10 * NS_PER_MS, write_ns=20 * NS_PER_MS, clock=clock
    )
    waits = [
        waited(clock, lambda: st.preadv(buf(10), 0)),
        waited(clock, lambda: st.cache(0, 10)),
        waited(clock, lambda: st.pwritev(buf(10), 0, fua=False)),
        waited(clock, lambda: st.trim(0, 10, fua=False)),
        waited(clock, lambda: st.zero(0, 10, may_trim=True, fast_only=False, fua=False)),
        waited(clock, st.flush),
        waited(clock, lambda: st.extents(0, 10)),  # not delayed
    ]
    ms = NS_PER_MS
    assert waits == [10 * ms, 10 * ms, 20 * ms, 20 * ms, 20 * ms, 20 * ms, 0]


def test_delay_is_really_observed():
    st = open_storage("null:1M,delay=5ms")
    clock = MonotonicClock()
    t0 = clock.now_ns()
    st.preadv(buf(4096), 0)
    st.pwritev(buf(4096), 0, fua=False)
    assert clock.now_ns() - t0 >= 10 * NS_PER_MS  # two 5 ms waits (lower bound only)


def test_rate_bucket_arithmetic():
    clock = ManualClock(100 * NS_PER_S)
    st = RateFilter(NullStorage(1 << 30), rate=1000, burst=500, clock=clock)
    assert waited(clock, lambda: st.preadv(buf(500), 0)) == 0  # the full bucket pays for it
    # 1000 bytes of debt at 1000 B/s
    assert waited(clock, lambda: st.pwritev(buf(1000), 0, fua=False)) == NS_PER_S
    assert waited(clock, lambda: st.trim(0, 10**6, fua=False)) == 0  # no data moved: free
    assert waited(clock, st.flush) == 0
    clock.advance_ns(10 * NS_PER_S)  # idle: refills only up to the burst
    assert waited(clock, lambda: st.preadv(buf(700), 0)) == NS_PER_S // 5
    assert st.bytes_admitted == 2200
    assert "rate(" in repr(st)


def test_rate_shared_by_threads():
    # 2 threads x 16 x 16 KiB = 512 KiB at 2 MiB/s with a 16 KiB bucket: >= ~0.24 s
    st = RateFilter(MemoryStorage(1 << 20), rate=2 << 20, burst=16 << 10)
    errors = []

    def worker(k):
        try:
            b = buf(16 << 10)
            for i in range(16):
                st.pwritev(b, (k * 16 + i) * (16 << 10), fua=False)
        except Exception as exc:
            errors.append(exc)

    clock = MonotonicClock()
    t0 = clock.now_ns()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = (clock.now_ns() - t0) / NS_PER_S
    assert not errors
    assert st.bytes_admitted == 512 << 10
    assert elapsed >= ((512 - 16) << 10) / (2 << 20) * 0.9
    st.close()


def test_error_probability_replays_from_seed():
    def pattern(seed):
        st = ErrorFilter(NullStorage(1 << 20), probability=0.3, seed=seed)
        out = []
        for _ in range(200):
            try:
                st.preadv(buf(16), 0)
                out.append(False)
            except StorageIOError:
                out.append(True)
        return out, st.injected

    a, n = pattern(5)
    b, _ = pattern(5)
    c, _ = pattern(6)
    assert a == b
    assert a != c
    assert 30 <= n <= 90  # ~60 expected
    assert sum(a) == n


def test_error_range_and_ops():
    st = open_storage("memory:1M,error-range=64K-128K,error-ops=write,zero")
    assert isinstance(st, ErrorFilter)
    st.preadv(buf(4096), 64 << 10)  # reads are not in ops
    st.pwritev(buf(4096), 0, fua=False)  # outside the range
    st.pwritev(buf(4096), 128 << 10, fua=False)  # END is exclusive
    with pytest.raises(StorageIOError, match="injected"):
        st.pwritev(buf(4096), (64 << 10) - 1, fua=False)  # touches the first byte
    with pytest.raises(StorageIOError):
        st.zero(100 << 10, 1, may_trim=True, fast_only=False, fua=False)
    st.trim(64 << 10, 4096, fua=False)
    st.flush()
    st.close()


def test_failed_write_changes_nothing():
    st = open_storage("memory:1M,error=1,error-ops=write")
    b = [memoryview(bytearray(b"\x01" * 4096))]
    with pytest.raises(StorageIOError):
        st.pwritev(b, 0, fua=False)
    out = bytearray(b"\xff" * 4096)
    st.preadv([memoryview(out)], 0)
    assert out == bytes(4096)
    st.close()


def test_flush_never_matches_a_range():
    st = ErrorFilter(NullStorage(1 << 20), error_range=(0, 1 << 20))
    st.flush()
    with pytest.raises(StorageIOError):
        st.cache(0, 1)
    with pytest.raises(ValueError):
        ErrorFilter(NullStorage(1), ops=["scribble"])
