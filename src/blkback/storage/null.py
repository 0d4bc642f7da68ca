"""``null:SIZE``: writes are discarded, reads return zeroes.

An emulated remote volume with no local footprint: combined with the delay and rate filters
it stands in for the slow network-backed volumes of the seed experiment, without a byte of
local storage.
"""

from __future__ import annotations

from typing import Final

from blkback.errors import ConfigError

from .base import (
    HOLE,
    MAX_SIZE,
    ZERO,
    Capabilities,
    buffers_length,
    check_read_range,
    check_write_range,
    format_size,
    refuse_readonly,
)

# Reads copy from this shared zero buffer: a slice assignment is one memcpy in C, faster
# than a ctypes.memset that first needs the buffer's address.
_ZERO_CHUNK: Final = 1 << 20
_ZEROES: Final = memoryview(bytes(_ZERO_CHUNK))


def fill_zero(buf: memoryview) -> None:
    """Set every byte of ``buf`` to zero."""
    if buf.format != "B" or buf.ndim != 1:
        buf = buf.cast("B")
    n = len(buf)
    if n <= _ZERO_CHUNK:
        buf[:] = _ZEROES[:n]
        return
    for start in range(0, n, _ZERO_CHUNK):
        stop = min(start + _ZERO_CHUNK, n)
        buf[start:stop] = _ZEROES[: stop - start]


class NullStorage(Capabilities):
    """Discards writes; reads, extents and everything else say "all zeroes"."""

    kind = "null"

    def __init__(self, size: int, *, readonly: bool = False) -> None:
        """Make a null export.

        Args:
            size: Size in bytes (> 0).
            readonly: Refuse modifying requests.

        Raises:
            ConfigError: Bad size.
        """
        if not 0 < size <= MAX_SIZE:
            raise ConfigError(f"null: size must be between 1 and {MAX_SIZE} bytes")
        self.size = size
        self.set_capabilities(readonly=readonly, inline=True)

    def preadv(self, bufs: list[memoryview], offset: int) -> None:
        """Fill ``bufs`` with zeroes.

        Raises:
            InvalidRequestError: The range is outside the export.
        """
        check_read_range(self.size, offset, buffers_length(bufs), "read")
        for b in bufs:
            fill_zero(b)

    def pwritev(self, bufs: list[memoryview], offset: int, fua: bool) -> None:
        """Discard the data (after the checks a real volume would make).

        Raises:
            ReadOnlyError: The export is read-only.
            NoSpaceError: The range runs past the end.
        """
        refuse_readonly(self.readonly, "write")
        check_write_range(self.size, offset, buffers_length(bufs), "write")

    def flush(self) -> None:
        """Nothing to make durable."""

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Accept and ignore.

        Raises:
            ReadOnlyError: The export is read-only.
            InvalidRequestError: The range is outside the export.
        """
        refuse_readonly(self.readonly, "trim")
        check_read_range(self.size, offset, length, "trim")

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool, fua: bool) -> None:
        """Accept and ignore: the range already reads as zeroes, so it is fast too.

        Raises:
            ReadOnlyError: The export is read-only.
            NoSpaceError: The range runs past the end.
        """
        refuse_readonly(self.readonly, "zero")
        check_write_range(self.size, offset, length, "zero")

    def cache(self, offset: int, length: int) -> None:
        """Accept and ignore.

        Raises:
            InvalidRequestError: The range is outside the export.
        """
        check_read_range(self.size, offset, length, "cache")

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """One run: the whole range is a hole of zeroes.

        Raises:
            InvalidRequestError: The range is outside the export.
        """
        check_read_range(self.size, offset, length, "extents")
        return [(length, HOLE | ZERO)] if length else []

    def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        ro = ", readonly" if self.readonly else ""
        return f"null({format_size(self.size)}{ro})"
