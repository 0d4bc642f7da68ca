from __future__ import annotations

import threading
import time

import pytest

from blkback.errors import StorageIOError
from blkback.storage import (
    DelayFilter,
    ErrorFilter,
    MemoryStorage,
    NullStorage,
    RateFilter,
    open_storage,
)


class FakeTime:
    """A clock that only sleeping moves (single-threaded tests)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def buf(n: int) -> list[memoryview]:
    return [memoryview(bytearray(n))]


def test_filters_pass_capabilities_through_and_are_not_inline():
    inner = MemoryStorage(1 << 20)
    st = DelayFilter(inner, read_s=0, write_s=0)
    for name in ("size", "readonly", "can_flush", "can_fua", "can_trim", "can_zero"):
        assert getattr(st, name) == getattr(inner, name)
    assert st.can_fast_zero == inner.can_fast_zero
    assert st.can_extents == inner.can_extents
    assert inner.inline
    assert not st.inline
    st.close()


def test_delay_per_operation_class():
    ft = FakeTime()
    st = DelayFilter(NullStorage(1 << 20), read_s=0.01, write_s=0.02, sleep=ft.sleep)
    st.preadv(buf(10), 0)
    st.cache(0, 10)
    st.pwritev(buf(10), 0, fua=False)
    st.trim(0, 10, fua=False)
    st.zero(0, 10, may_trim=True, fast_only=False, fua=False)
    st.flush()
    st.extents(0, 10)  # not delayed
    assert ft.sleeps == [0.01, 0.01, 0.02, 0.02, 0.02, 0.02]


def test_delay_is_really_observed():
    st = open_storage("null:1M,delay=5ms")
    t0 = time.monotonic()
    st.preadv(buf(4096), 0)
    st.pwritev(buf(4096), 0, fua=False)
    assert time.monotonic() - t0 >= 0.009  # two 5 ms sleeps (lower bound only)


def test_rate_bucket_arithmetic():
    ft = FakeTime()
    st = RateFilter(NullStorage(1 << 30), rate=1000, burst=500, clock=ft.clock, sleep=ft.sleep)
    st.preadv(buf(500), 0)  # the full bucket pays for it
    assert ft.sleeps == []
    st.pwritev(buf(1000), 0, fua=False)  # 1000 bytes of debt at 1000 B/s
    assert ft.sleeps == [pytest.approx(1.0)]
    st.trim(0, 10**6, fua=False)  # no data moved: free
    st.flush()
    assert len(ft.sleeps) == 1
    ft.now += 10  # idle: refills only up to the burst
    st.preadv(buf(700), 0)
    assert ft.sleeps[-1] == pytest.approx(0.2)
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

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
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
