from __future__ import annotations

import pytest
from storage_helpers import PAGE, fill, joined, page_buffers

from blkback.errors import ConfigError, InvalidRequestError, NoSpaceError, ReadOnlyError
from blkback.storage import HOLE, ZERO, NullStorage, open_storage
from blkback.storage.null import fill_zero


def test_reads_are_zero_and_writes_vanish():
    st = open_storage("null:64M")
    assert isinstance(st, NullStorage)
    assert st.inline
    assert st.can_multi_conn
    _, bufs = page_buffers(16 * PAGE)
    fill(bufs, b"\xaa" * (16 * PAGE))
    st.pwritev(bufs, 0, fua=True)
    st.preadv(bufs, 0)  # the same (dirty) buffers come back zeroed
    assert joined(bufs) == bytes(16 * PAGE)
    st.zero(0, 1 << 20, may_trim=False, fast_only=True, fua=False)  # zero is always fast
    st.trim(0, 1 << 20, fua=False)
    st.flush()
    st.cache(0, st.size)
    assert st.extents(4096, 1 << 20) == [(1 << 20, HOLE | ZERO)]
    assert repr(st) == "null(64 MiB)"
    st.close()


def test_fill_zero_large_and_cast_buffers():
    big = bytearray(b"\x01" * (3 << 20) + b"\x02" * 5)
    fill_zero(memoryview(big))
    assert big == bytes(len(big))
    words = bytearray(b"\xff" * 64)
    fill_zero(memoryview(words).cast("I"))
    assert words == bytes(64)


def test_bounds_and_readonly():
    st = NullStorage(8192, readonly=True)
    with pytest.raises(ReadOnlyError):
        st.pwritev([memoryview(b"x")], 0, fua=False)
    with pytest.raises(ReadOnlyError):
        st.zero(0, 1, may_trim=True, fast_only=False, fua=False)
    with pytest.raises(ReadOnlyError):
        st.trim(0, 1, fua=False)
    with pytest.raises(InvalidRequestError):
        st.preadv([memoryview(bytearray(2))], 8191)
    st2 = NullStorage(8192)
    with pytest.raises(NoSpaceError):
        st2.pwritev([memoryview(b"xy")], 8191, fua=False)
    with pytest.raises(InvalidRequestError):
        st2.extents(8192, 1)
    with pytest.raises(ConfigError):
        NullStorage(0)
