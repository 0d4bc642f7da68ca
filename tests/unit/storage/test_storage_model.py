"""Random request sequences against a bytearray model, for every backend (Hypothesis)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storage_helpers import PAGE, page_buffers

from blkback.storage import (
    HOLE,
    ZERO,
    AnonMemoryStorage,
    MemoryStorage,
    NullStorage,
    Storage,
    open_file,
)

SIZE = 64 * 1024 + 1000  # not a multiple of the page size on purpose

# ("write", offset, length, byte, aligned_buffers, fua) | ("read", offset, length, aligned)
# | ("trim", offset, length) | ("zero", offset, length, may_trim) | ("flush",) | ("extents", o, l)
pages_ = st.integers(0, SIZE // PAGE - 1)


@st.composite
def ranges(draw: st.DrawFn, aligned: bool) -> tuple[int, int]:
    if aligned:
        first = draw(pages_)
        n = draw(st.integers(1, min(4, SIZE // PAGE - first)))
        return first * PAGE, n * PAGE
    offset = draw(st.integers(0, SIZE - 1))
    return offset, draw(st.integers(1, min(3 * PAGE, SIZE - offset)))


@st.composite
def ops(draw: st.DrawFn) -> tuple[object, ...]:
    kind = draw(
        st.sampled_from(["write", "write", "read", "read", "trim", "zero", "flush", "extents"])
    )
    aligned = draw(st.booleans())
    offset, length = draw(ranges(aligned))
    if kind == "write":
        return ("write", offset, length, draw(st.integers(1, 255)), aligned, draw(st.booleans()))
    if kind == "read":
        return ("read", offset, length, aligned)
    if kind == "zero":
        return ("zero", offset, length, draw(st.booleans()))
    if kind == "flush":
        return ("flush",)
    return (kind, offset, length)


def make_buffers(length: int, aligned: bool) -> list[memoryview]:
    if aligned:
        _, bufs = page_buffers(length)
        return bufs
    # odd-sized pieces of an unaligned bytearray: the buffered path
    raw = memoryview(bytearray(length + 1))[1:]
    cut = length // 3
    return [raw[:cut], raw[cut:]]


def run(storage: Storage, sequence: list[tuple[object, ...]], null: bool) -> None:
    model = bytearray(SIZE)
    try:
        for op in sequence:
            name = op[0]
            if name == "write":
                _, offset, length, byte, aligned, fua = op
                bufs = make_buffers(length, aligned)
                for b in bufs:
                    b[:] = bytes([byte]) * len(b)
                storage.pwritev(bufs, offset, fua=fua)
                if not null:
                    model[offset : offset + length] = bytes([byte]) * length
            elif name == "read":
                _, offset, length, aligned = op
                bufs = make_buffers(length, aligned)
                for b in bufs:
                    b[:] = b"\x5a" * len(b)  # dirty: a read must overwrite everything
                storage.preadv(bufs, offset)
                assert b"".join(bytes(b) for b in bufs) == model[offset : offset + length]
            elif name == "trim":
                _, offset, length = op
                storage.trim(offset, length, fua=False)
                # NBD leaves trimmed content unspecified; ours punches holes: zeroes
                model[offset : offset + length] = bytes(length)
            elif name == "zero":
                _, offset, length, may_trim = op
                storage.zero(offset, length, may_trim=may_trim, fast_only=False, fua=False)
                model[offset : offset + length] = bytes(length)
            elif name == "flush":
                storage.flush()
            else:
                _, offset, length = op
                runs = storage.extents(offset, length)
                assert runs
                assert sum(n for n, _ in runs) <= length
                pos = offset
                for n, flags in runs:
                    assert n > 0
                    if flags & ZERO:
                        assert model[pos : pos + n] == bytes(n)
                    assert flags in (0, HOLE | ZERO)
                    pos += n
        # final full comparison
        out = bytearray(SIZE)
        storage.preadv([memoryview(out)], 0)
        assert out == model
    finally:
        storage.close()


SEQUENCES = st.lists(ops(), min_size=1, max_size=25)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def model_test(factory: Callable[[], Storage], null: bool = False) -> Callable[..., None]:
    @SETTINGS
    @given(SEQUENCES)
    def test(sequence: list[tuple[object, ...]]) -> None:
        run(factory(), sequence, null)

    return test


def _file_factory(directory: str) -> Callable[[], Storage]:
    def make() -> Storage:
        fd, path = tempfile.mkstemp(dir=directory)
        os.close(fd)
        os.unlink(path)
        st = open_file(path, SIZE, readonly=False, direct="auto")
        os.unlink(path)  # the open descriptors keep it alive until close
        return st

    return make


test_model_memfd = model_test(lambda: MemoryStorage(SIZE))
test_model_memory = model_test(lambda: AnonMemoryStorage(SIZE))
test_model_null = model_test(lambda: NullStorage(SIZE), null=True)
test_model_file_ext4 = model_test(_file_factory(tempfile.gettempdir()))
test_model_file_tmpfs = model_test(_file_factory("/dev/shm"))
