"""What the fast path calls to move a request's data: :class:`DirectIO`.

A storage that offers direct access (:meth:`~blkback.storage.base.Storage.direct_access`) is
served through one of these: its :class:`~blkback.storage.region.MemoryRegion`, or a plain
descriptor's ``preadv``/``pwritev`` (``blkback.server.direct_io.DescriptorIO``).

A base class, not a ``Protocol``: the module is compiled with the data path
(``blkback._native``), and a ring's read or write through a compiled base class is a direct
call rather than a Python method lookup, once per request.
"""

from __future__ import annotations


class DirectIO:
    """Reads and writes of the fast path; errors raise ``RequestError``.

    Both are called with a request's page *spans* (``MmapAllocator.spans``): one or a few
    memoryviews whose lengths add up to ``length``.
    """

    def read(self, views: list[memoryview], offset: int, length: int) -> None:
        """Fill ``views`` with ``length`` bytes of the export from ``offset``."""
        raise NotImplementedError

    def write(self, views: list[memoryview], offset: int, length: int) -> None:
        """Store the ``length`` bytes of ``views`` at ``offset``."""
        raise NotImplementedError
