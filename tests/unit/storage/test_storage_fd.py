"""file: and memory: backends on real files (ext4 under /tmp, tmpfs under /dev/shm) and memfd."""

from __future__ import annotations

import os
import threading

import pytest
from storage_helpers import (
    PAGE,
    allocated_bytes,
    fill,
    joined,
    page_buffers,
    shm_dir,
    supports_direct,
)

from blkback.errors import (
    ConfigError,
    InvalidRequestError,
    NoSpaceError,
    ReadOnlyError,
    UnsupportedError,
)
from blkback.storage import HOLE, ZERO, FileStorage, MemoryStorage, open_file, open_storage
from blkback.storage import fd as fdmod

MiB = 1 << 20


@pytest.fixture
def ext_file(tmp_path):
    """A fresh 4 MiB file: storage plus path. tmp_path is on ext4 on this machine."""
    path = str(tmp_path / "disk.img")
    st = open_file(path, 4 * MiB, readonly=False, direct="auto")
    yield st, path
    st.close()


@pytest.fixture(params=["file", "memory"])
def any_fd_storage(request, tmp_path):
    if request.param == "file":
        st = open_storage(f"file:{tmp_path / 'x.img'}:8M")
    else:
        st = open_storage("memory:8M")
    yield st
    st.close()


def test_created_sparse_at_size(ext_file):
    st, path = ext_file
    assert st.size == os.path.getsize(path) == 4 * MiB
    assert allocated_bytes(path) == 0
    assert st.extents(0, st.size) == [(st.size, HOLE | ZERO)]
    assert "file(" in repr(st)


def test_round_trip_page_buffers(any_fd_storage):
    st = any_fd_storage
    _, wbufs = page_buffers(64 * 1024)
    data = os.urandom(64 * 1024)
    fill(wbufs, data)
    st.pwritev(wbufs, 8192, fua=False)
    _, rbufs = page_buffers(64 * 1024)
    st.preadv(rbufs, 8192)
    assert joined(rbufs) == data
    # holes around it read as zeroes
    _, z = page_buffers(8192)
    st.preadv(z, 0)
    assert joined(z) == bytes(8192)


def test_round_trip_unaligned(any_fd_storage):
    st = any_fd_storage
    data = os.urandom(10000)
    backing = bytearray(data)
    bufs = [memoryview(backing)[:3], memoryview(backing)[3:5000], memoryview(backing)[5000:]]
    st.pwritev(bufs, 4097, fua=True)
    out = bytearray(10000)
    st.preadv([memoryview(out)[:1], memoryview(out)[1:]], 4097)
    assert out == data
    # empty buffers in the list are fine
    out2 = bytearray(100)
    st.preadv([memoryview(out2)[:0], memoryview(out2), memoryview(bytearray())], 4097)
    assert out2 == data[:100]


def test_more_buffers_than_iov_max(any_fd_storage):
    st = any_fd_storage
    n = fdmod.IOV_MAX + 10
    _, wbufs = page_buffers(n * PAGE)
    data = os.urandom(n * PAGE)
    fill(wbufs, data)
    st.pwritev(wbufs, 0, fua=False)
    _, rbufs = page_buffers(n * PAGE)
    st.preadv(rbufs, 0)
    assert joined(rbufs) == data


def test_o_direct_used_on_ext4_when_aligned(tmp_path):
    if not supports_direct(str(tmp_path)):
        pytest.skip(f"{tmp_path} does not support O_DIRECT (not ext4/xfs?)")
    st = open_file(str(tmp_path / "d.img"), MiB, readonly=False, direct="on")
    try:
        assert st.direct_active
        _, bufs = page_buffers(16 * PAGE)
        fill(bufs, b"\xa5" * (16 * PAGE))
        st.pwritev(bufs, 0, fua=True)
        assert st._direct_ok  # the aligned write went through the O_DIRECT descriptor
        _, rbufs = page_buffers(16 * PAGE)
        st.preadv(rbufs, 0)
        assert joined(rbufs) == b"\xa5" * (16 * PAGE)
        # a misaligned buffer address (lengths aligned): EINVAL, redone through the cache
        raw = bytearray(PAGE + 1)
        view = memoryview(raw)[1:]
        st.preadv([view], 0)
        assert bytes(view) == b"\xa5" * PAGE
        view[:] = b"\x11" * PAGE
        st.pwritev([view], PAGE, fua=False)
        out = bytearray(PAGE)
        st.preadv([memoryview(out)], PAGE)
        assert out == b"\x11" * PAGE
        assert st.direct_active  # one misaligned request does not switch direct off
    finally:
        st.close()


def test_tmpfs_buffered_round_trip():
    # Linux >= 6.6 accepts O_DIRECT on tmpfs; older kernels refuse it at open (EINVAL).
    # Either way a tmpfs file must work.
    with shm_dir() as d:
        path = os.path.join(d, "t.img")
        st = open_file(path, MiB, readonly=False, direct="auto")
        try:
            assert st.direct_active == supports_direct(d)
            _, bufs = page_buffers(4 * PAGE)
            fill(bufs, b"z" * (4 * PAGE))
            st.pwritev(bufs, 0, fua=True)
            _, rbufs = page_buffers(4 * PAGE)
            st.preadv(rbufs, 0)
            assert joined(rbufs) == b"z" * (4 * PAGE)
        finally:
            st.close()


def test_o_direct_refused_at_open_falls_back(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:  # what tmpfs before Linux 6.6 and some FUSE mounts do
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(fdmod.os, "open", refusing_open)
    path = str(tmp_path / "nd.img")
    st = open_file(path, MiB, readonly=False, direct="auto")
    try:
        assert not st.direct_active
        assert "O_DIRECT" not in repr(st)
        _, bufs = page_buffers(4 * PAGE)
        fill(bufs, b"q" * (4 * PAGE))
        st.pwritev(bufs, 0, fua=False)
        _, rbufs = page_buffers(4 * PAGE)
        st.preadv(rbufs, 0)
        assert joined(rbufs) == b"q" * (4 * PAGE)
    finally:
        st.close()
    with pytest.raises(ConfigError, match="O_DIRECT refused"):
        open_file(path, None, readonly=False, direct="on")


def test_direct_given_up_when_every_request_is_refused(ext_file, monkeypatch):
    st, _ = ext_file
    if not st.direct_active:
        pytest.skip("no O_DIRECT here")
    real = os.preadv
    direct_fd = st._direct_fd

    def refusing(fd, bufs, offset):
        if fd == direct_fd:
            raise OSError(22, "Invalid argument")
        return real(fd, bufs, offset)

    monkeypatch.setattr(fdmod.os, "preadv", refusing)
    for _ in range(5):  # misaligned buffers are the caller's fault: they do not count
        st.preadv([memoryview(bytearray(PAGE + 1))[1:]], 0)
    assert st.direct_active
    _, bufs = page_buffers(PAGE)
    for _ in range(3):
        st.preadv(bufs, 0)
    assert not st.direct_active


def test_trim_makes_holes_and_frees_blocks(ext_file):
    st, path = ext_file
    _, bufs = page_buffers(MiB)
    fill(bufs, b"\xff" * MiB)
    st.pwritev(bufs, 0, fua=True)
    assert allocated_bytes(path) >= MiB
    assert st.extents(0, MiB) == [(MiB, 0)]
    st.trim(64 * 1024, 256 * 1024, fua=True)
    assert allocated_bytes(path) <= MiB - 256 * 1024
    assert st.extents(0, MiB) == [
        (64 * 1024, 0),
        (256 * 1024, HOLE | ZERO),
        (MiB - 320 * 1024, 0),
    ]
    out = bytearray(256 * 1024)
    st.preadv([memoryview(out)], 64 * 1024)
    assert out == bytes(256 * 1024)


def test_memory_trim_releases_memfd_pages():
    st = MemoryStorage(4 * MiB)
    try:
        _, bufs = page_buffers(MiB)
        fill(bufs, b"m" * MiB)
        st.pwritev(bufs, 0, fua=False)
        assert os.fstat(st._fd).st_blocks * 512 >= MiB
        st.trim(0, MiB, fua=False)
        assert os.fstat(st._fd).st_blocks == 0
        assert st.extents(0, 4 * MiB) == [(4 * MiB, HOLE | ZERO)]
        assert st.inline is True
    finally:
        st.close()


def test_zero_may_trim_punches(ext_file):
    st, path = ext_file
    _, bufs = page_buffers(MiB)
    fill(bufs, b"\x01" * MiB)
    st.pwritev(bufs, 0, fua=False)
    st.zero(0, MiB, may_trim=True, fast_only=True, fua=True)
    assert allocated_bytes(path) == 0
    assert st.extents(0, MiB)[0] == (MiB, HOLE | ZERO)
    _, rbufs = page_buffers(MiB)
    st.preadv(rbufs, 0)
    assert joined(rbufs) == bytes(MiB)


def test_zero_no_hole_keeps_allocation(ext_file):
    st, path = ext_file
    _, bufs = page_buffers(MiB)
    fill(bufs, b"\x01" * MiB)
    st.pwritev(bufs, 0, fua=False)
    st.zero(4096, 512 * 1024, may_trim=False, fast_only=True, fua=False)
    assert allocated_bytes(path) >= MiB  # ZERO_RANGE: zeroes stay allocated
    _, rbufs = page_buffers(MiB)
    st.preadv(rbufs, 0)
    assert joined(rbufs) == b"\x01" * 4096 + bytes(512 * 1024) + b"\x01" * (MiB - 4096 - 512 * 1024)


def test_zero_on_tmpfs_without_zero_range_punches_then_allocates():
    with shm_dir() as d:
        path = os.path.join(d, "t.img")
        st = open_file(path, MiB, readonly=False, direct="auto")
        try:
            st.pwritev([memoryview(b"\x07" * MiB)], 0, fua=False)
            st.zero(0, 64 * 1024, may_trim=False, fast_only=True, fua=False)
            assert allocated_bytes(path) == MiB  # still allocated, as NO_HOLE asks
            out = bytearray(64 * 1024)
            st.preadv([memoryview(out)], 0)
            assert out == bytes(64 * 1024)
        finally:
            st.close()


def test_fast_only_refused_where_zeroing_would_be_slow(ext_file):
    st, _ = ext_file
    st.pwritev([memoryview(b"\x09" * 8192)], 0, fua=False)
    # pretend the filesystem has no fallocate at all (e.g. NFSv3): only writing zeroes is left
    st._can_punch = False
    st._can_zero_range = False
    with pytest.raises(UnsupportedError):
        st.zero(0, 8192, may_trim=True, fast_only=True, fua=False)
    out = bytearray(8192)
    st.preadv([memoryview(out)], 0)
    assert out == b"\x09" * 8192  # refused means unchanged
    for _ in range(4):  # the slow path works, and its unaligned zero buffer
        st.zero(0, 8192, may_trim=True, fast_only=False, fua=True)
    st.preadv([memoryview(out)], 0)
    assert out == bytes(8192)
    assert st.direct_active == st._direct  # ...never counts against O_DIRECT
    if st._direct_fd >= 0:
        assert st.direct_active


def test_fallocate_unsupported_is_learnt(ext_file, monkeypatch):
    st, _ = ext_file
    calls = []

    def no_fallocate(fd, mode, offset, length):
        calls.append(mode)
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(fdmod, "fallocate", no_fallocate)
    st.pwritev([memoryview(b"\x05" * 4096)], 0, fua=False)
    st.trim(0, 4096, fua=False)  # a hint: silently nothing
    with pytest.raises(UnsupportedError):
        st.zero(0, 4096, may_trim=True, fast_only=True, fua=False)
    n = len(calls)
    with pytest.raises(UnsupportedError):
        st.zero(0, 4096, may_trim=True, fast_only=True, fua=False)
    assert len(calls) == n  # not retried
    st.zero(0, 4096, may_trim=False, fast_only=False, fua=False)
    out = bytearray(4096)
    st.preadv([memoryview(out)], 0)
    assert out == bytes(4096)


def test_extents_mixed_and_prefix(any_fd_storage):
    st = any_fd_storage
    st.pwritev([memoryview(b"d" * 8192)], 64 * 1024, fua=False)
    runs = st.extents(0, st.size)
    assert sum(n for n, _ in runs) == st.size
    assert runs[0] == (64 * 1024, HOLE | ZERO)
    assert runs[1][1] == 0
    # a sub-range starting inside data
    assert st.extents(64 * 1024 + 100, 200) == [(200, 0)]
    assert st.extents(0, 0) == []


def test_bounds_and_errnos(any_fd_storage):
    st = any_fd_storage
    with pytest.raises(InvalidRequestError):
        st.preadv([memoryview(bytearray(2))], st.size - 1)
    with pytest.raises(NoSpaceError):
        st.pwritev([memoryview(b"ab")], st.size - 1, fua=False)
    with pytest.raises(InvalidRequestError):
        st.trim(st.size, 1, fua=False)
    with pytest.raises(NoSpaceError):
        st.zero(st.size - 1, 2, may_trim=True, fast_only=False, fua=False)
    with pytest.raises(InvalidRequestError):
        st.cache(-1, 10)
    with pytest.raises(InvalidRequestError):
        st.extents(0, st.size + 1)


def test_cache_and_flush(any_fd_storage):
    st = any_fd_storage
    st.pwritev([memoryview(b"c" * 4096)], 0, fua=False)
    st.flush()
    st.cache(0, st.size)
    assert st.can_flush
    assert st.can_fua
    assert st.can_cache
    assert st.can_multi_conn


def test_readonly(tmp_path):
    path = str(tmp_path / "ro.img")
    with open(path, "wb") as f:
        f.write(b"r" * 8192)
    st = open_storage(f"file:{path},readonly")
    try:
        assert st.readonly
        assert not st.can_trim
        assert not st.can_zero
        out = bytearray(8192)
        st.preadv([memoryview(out)], 0)
        assert out == b"r" * 8192
        with pytest.raises(ReadOnlyError):
            st.pwritev([memoryview(b"x")], 0, fua=False)
        with pytest.raises(ReadOnlyError):
            st.trim(0, 4096, fua=False)
        with pytest.raises(ReadOnlyError):
            st.zero(0, 4096, may_trim=True, fast_only=False, fua=False)
    finally:
        st.close()
    m = open_storage("memory:1M,ro")
    with pytest.raises(ReadOnlyError):
        m.pwritev([memoryview(b"x")], 0, fua=False)
    m.close()


def test_existing_file_size_rules(tmp_path):
    path = str(tmp_path / "e.img")
    with open(path, "wb") as f:
        f.write(b"e" * 10000)
    st = open_storage(f"file:{path}")
    assert st.size == 10000  # existing file: its size, not a multiple of 4 KiB
    out = bytearray(10000 - 8192)
    st.preadv([memoryview(out)], 8192)  # the partial last block
    assert out == b"e" * len(out)
    st.close()
    st = open_storage(f"file:{path}:1M")  # a larger size grows it, sparse
    assert st.size == os.path.getsize(path) == MiB
    st.close()
    with pytest.raises(ConfigError, match="refusing to shrink"):
        open_storage(f"file:{path}:4K")
    with pytest.raises(ConfigError, match="read-only"):
        open_storage(f"file:{path}:2M,readonly")
    assert os.path.getsize(path) == MiB


def test_missing_file_needs_size(tmp_path):
    path = tmp_path / "missing.img"
    with pytest.raises(ConfigError, match="give a size"):
        open_storage(f"file:{path}")
    with pytest.raises(ConfigError, match="does not exist"):
        open_storage(f"file:{path}:1M,readonly")
    assert not path.exists()
    with pytest.raises(ConfigError, match=r"directory .* does not exist"):
        open_storage(f"file:{tmp_path}/no/such/dir/x.img:1M")
    with pytest.raises(ConfigError, match="not a regular file"):
        open_storage(f"file:{tmp_path},readonly")


def test_close_is_idempotent(tmp_path):
    st = open_storage(f"file:{tmp_path / 'c.img'}:1M")
    st.close()
    st.close()


def test_concurrent_writers_and_readers(any_fd_storage):
    st = any_fd_storage
    n_threads, per = 4, 32
    errors = []

    def worker(k):
        try:
            _, bufs = page_buffers(2 * PAGE)
            for i in range(per):
                off = (k * per + i) * 2 * PAGE
                pattern = bytes([k + 1]) * (2 * PAGE)
                fill(bufs, pattern)
                st.pwritev(bufs, off, fua=False)
                _, rb = page_buffers(2 * PAGE)
                st.preadv(rb, off)
                assert joined(rb) == pattern
        except Exception as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.root
def test_block_device_via_loop(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to attach a loop device")
    import subprocess

    img = tmp_path / "blk.img"
    with open(img, "wb") as f:
        f.truncate(2 * MiB)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(img)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        st = open_storage(f"file:{dev}")
        try:
            assert isinstance(st, FileStorage)
            assert st.block_device
            assert st.size == 2 * MiB
            _, bufs = page_buffers(8 * PAGE)
            fill(bufs, b"\x42" * (8 * PAGE))
            st.pwritev(bufs, 4 * PAGE, fua=True)
            _, rb = page_buffers(8 * PAGE)
            st.preadv(rb, 4 * PAGE)
            assert joined(rb) == b"\x42" * (8 * PAGE)
            st.zero(4 * PAGE, 8 * PAGE, may_trim=True, fast_only=False, fua=False)
            st.preadv(rb, 4 * PAGE)
            assert joined(rb) == bytes(8 * PAGE)
            assert sum(n for n, _ in st.extents(0, st.size)) == st.size
        finally:
            st.close()
        with pytest.raises(ConfigError, match="block device size"):
            open_storage(f"file:{dev}:1M")
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
