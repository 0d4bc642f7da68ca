"""``MemoryRegion``: the memory backend's copies (in pieces) and its page marks."""

from __future__ import annotations

import mmap
import random
import sys
import threading
import time

from blkback.storage.region import COPY_PIECE, GIL_FREE_COPY, MAP_CHUNK, MAP_SHIFT, MemoryRegion

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


def test_runs_of_marks_are_found_across_the_scan_chunks() -> None:
    # Block status reads the map in runs (run_at), scanning MAP_CHUNK entries at a time: a
    # run that ends in a later chunk, or never, must come out whole. The mapping is never
    # touched, so its pages take no memory.
    pages = 2 * MAP_CHUNK + 300
    memory = mmap.mmap(-1, pages * PAGE)
    try:
        region = MemoryRegion(memory)
        lone = MAP_CHUNK + 7
        region.mark(lone * PAGE, 1)
        assert region.run_at(0) == (False, lone)
        assert region.run_at(lone) == (True, lone + 1)
        assert region.run_at(lone + 1) == (False, pages)
        region.mark(10 * PAGE, (2 * MAP_CHUNK + 5) * PAGE)  # pages 10 .. 2 * MAP_CHUNK + 14
        assert region.run_at(10) == (True, 2 * MAP_CHUNK + 15)
        assert region.run_at(9) == (False, 10)
        region.unmark(MAP_CHUNK, MAP_CHUNK + 1)
        assert region.run_at(10) == (True, MAP_CHUNK)
        assert region.run_at(MAP_CHUNK) == (False, MAP_CHUNK + 1)
        assert region.run_at(pages - 1) == (False, pages)
    finally:
        region.mem.release()
        memory.close()


def test_a_read_only_source_is_stored_by_slices_whole() -> None:
    # A read-only buffer cannot give its address to ctypes: the slice copy takes it.
    region = _region(2 * GIL_FREE_COPY // PAGE)
    data = random.Random(3).randbytes(GIL_FREE_COPY + 5)
    region.write([memoryview(data)], PAGE - 1, len(data))
    assert bytes(region.mem[PAGE - 1 : PAGE - 1 + len(data)]) == data


def test_a_large_write_lets_other_threads_run_while_it_copies() -> None:
    # The store worker's copy must not hold the GIL: the ring receives meanwhile. Another
    # thread that releases the GIL at every step (sleep(0)) makes progress during a large
    # write only if the write let go of it; with the switch interval at 10 s, no forced
    # switch hands it over while a copy that holds it runs.
    size = 64 << 20
    region = _region(size // PAGE)
    source = [memoryview(bytearray(b"z" * size))]
    steps = 0
    running = threading.Event()
    stop = threading.Event()

    def other() -> None:
        nonlocal steps
        while not stop.is_set():
            steps += 1
            running.set()
            time.sleep(0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    thread = threading.Thread(target=other)
    try:
        thread.start()
        assert running.wait(10)
        before = steps
        region.write(source, 0, size)
        during = steps - before
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert bytes(region.mem[size - 4 :]) == b"zzzz"
    assert during > 0, "the other thread never ran while 64 MiB were copied"
