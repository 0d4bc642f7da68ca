"""What a partial write leaves to send (``connection.unsent_tail``)."""

from __future__ import annotations

import pytest

from blkback.server.connection import unsent_tail


def _joined(bufs: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


@pytest.mark.parametrize("sent", range(8))
def test_the_tail_is_the_bytes_after_the_sent_ones(sent: int) -> None:
    bufs: list[bytes | memoryview] = [b"abc", memoryview(b"defg"), b"h"]
    tail = unsent_tail(bufs, sent)
    assert _joined(tail) == b"abcdefgh"[sent:]
    assert all(len(b) for b in tail)  # no empty buffer is sent again


def test_a_cut_inside_a_buffer_is_a_view_and_whole_buffers_are_kept_as_they_are() -> None:
    last = b"h"
    tail = unsent_tail([b"abc", b"defg", last], 5)
    assert isinstance(tail[0], memoryview) and bytes(tail[0]) == b"fg"
    assert tail[1] is last
