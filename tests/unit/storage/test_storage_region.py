"""``MemoryRegion``: the memory backend's copies (in pieces) and its page marks."""

from __future__ import annotations

import random

from blkback.storage.region import COPY_PIECE, MAP_SHIFT, MemoryRegion

PAGE = 1 << MAP_SHIFT


def _region(pages: int) -> MemoryRegion:
    return MemoryRegion(bytearray(pages * PAGE))


def test_a_write_larger_than_a_copy_piece_lands_whole_and_reads_back() -> None:
    region = _region(512)
    rng = random.Random(7)
    data = rng.randbytes(2 * COPY_PIECE + 3 * PAGE + 5)  # several pieces and a ragged end
    # Spans as the pool gives them: one long view, then a short one.
    views = [
        memoryview(bytearray(data[: COPY_PIECE + 1])),
        memoryview(bytearray(data[COPY_PIECE + 1 :])),
    ]
    offset = 3 * PAGE + 17
    region.write(views, offset, len(data))
    assert bytes(region.mem[offset : offset + len(data)]) == data
    assert not any(region.mem[:offset]) and not any(region.mem[offset + len(data) :])
    back = [
        memoryview(bytearray(COPY_PIECE + 9)),
        memoryview(bytearray(len(data) - COPY_PIECE - 9)),
    ]
    region.read(back, offset, len(data))
    assert b"".join(bytes(v) for v in back) == data


def test_a_write_marks_exactly_the_pages_it_touched() -> None:
    region = _region(16)
    region.write([memoryview(b"x" * (PAGE + 2))], 2 * PAGE - 1, PAGE + 2)
    assert list(region.used) == [0, 1, 1, 1] + [0] * 12
    region.write([memoryview(b"y")], 9 * PAGE, 1)  # the one-page case
    assert region.used[9] == 1
    region.unmark(1, 4)
    assert list(region.used) == [0] * 9 + [1] + [0] * 6
