"""The fast path's reads and writes: straight between pool pages and the storage's bytes.

A storage that declares :meth:`~blkback.storage.base.Storage.direct_access` lets the ring
move a request's data without calling the storage object: a copy to or from the server's
own memory (the storage's :class:`~blkback.storage.region.MemoryRegion`, which copies and
marks what it wrote), or one plain ``preadv``/``pwritev`` on a descriptor
(:class:`~blkback.storage.base.PlainDescriptor`). Both are a
:class:`~blkback.storage.direct.DirectIO`. The storage still owns the rules: the region is
the memory backend's own, and a short or failed transfer on a descriptor goes back to the
storage's own methods and error mapping.
"""

from __future__ import annotations

import os

from blkback.storage.base import DirectAccess, Storage, os_error
from blkback.storage.direct import DirectIO
from blkback.storage.region import MemoryRegion


class DescriptorIO(DirectIO):
    """One plain ``preadv``/``pwritev``; the storage finishes a short one and maps errors."""

    __slots__ = ("_fd", "_storage")

    def __init__(self, fd: int, storage: Storage) -> None:
        self._fd = fd
        self._storage = storage

    def read(self, views: list[memoryview], offset: int, length: int) -> None:
        try:
            done = os.preadv(self._fd, views, offset)
        except OSError as exc:
            raise os_error(exc, "fast-path read") from exc
        if done != length:
            self._storage.preadv(views, offset)  # it loops until the end

    def write(self, views: list[memoryview], offset: int, length: int) -> None:
        try:
            done = os.pwritev(self._fd, views, offset)
        except OSError as exc:
            raise os_error(exc, "fast-path write") from exc
        if done != length:
            self._storage.pwritev(views, offset, False)  # it loops until the end


def direct_io(storage: Storage) -> DirectIO | None:
    """The fast path for ``storage``, or None when every request must go through it.

    Only a storage served inline qualifies: one that may block belongs on worker threads.
    """
    if not storage.inline:
        return None
    access: DirectAccess | None = storage.direct_access()
    if access is None:
        return None
    if isinstance(access, MemoryRegion):
        return access  # it copies and marks itself
    return DescriptorIO(access.fd, storage)
