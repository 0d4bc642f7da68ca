"""The storage interface the server calls, and helpers shared by the backends.

Rule 1: every method of a :class:`Storage` may be called concurrently from several threads
(the connections of one export share one storage object, and a connection may hand requests
to worker threads). Backends therefore keep no per-call state in the object, and use
positional I/O only (``preadv``/``pwritev`` with an explicit offset, never the file position).

Rule 2: storage raises only the request errors of :mod:`blkback.errors` (``EIO``,
``ENOSPC``, ``EPERM``, ``ENOTSUP``, ``EINVAL``); an ``OSError`` never escapes, it is mapped at
the call that made it by :func:`os_error`, chained with ``raise ... from exc``.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from blkback.errors import (
    InvalidRequestError,
    NoSpaceError,
    ReadOnlyError,
    RequestError,
    StorageIOError,
)
from blkback.storage.region import MemoryRegion

#: ``base:allocation`` flag: the run is a hole (unallocated).
HOLE: Final = 1
#: ``base:allocation`` flag: the run reads as zeroes.
ZERO: Final = 2

# Largest offset/size a backend accepts: off_t is signed 64-bit (NBD sizes are u64, but
# lseek/preadv cannot address beyond this).
MAX_SIZE: Final = 2**63 - 1

_NO_SPACE_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


@dataclass(frozen=True, slots=True)
class PlainDescriptor:
    """Direct access to a storage for which plain ``os.preadv``/``os.pwritev`` on ``fd``,
    inside the size, are the whole read and write (no O_DIRECT, no sync, no filter).

    A short transfer is finished through the storage's own ``preadv``/``pwritev`` (which
    loop), and an ``OSError`` is mapped by :func:`os_error`, as the storage would.
    """

    fd: int


#: What :meth:`Storage.direct_access` may return: the two ways the server's fast path may
#: bypass the storage's methods. A :class:`MemoryRegion` (the storage's bytes are this
#: process's memory) does the copies and the marking itself.
DirectAccess = MemoryRegion | PlainDescriptor


class Storage(Protocol):
    """A block of ``size`` bytes that NBD requests read and write.

    The ``can_*`` attributes say which optional NBD commands the backend supports (the server
    advertises exactly these); they never change after the storage is opened.
    """

    size: int
    readonly: bool
    can_flush: bool
    can_fua: bool
    can_trim: bool
    can_zero: bool
    can_fast_zero: bool
    can_cache: bool
    can_extents: bool
    can_multi_conn: bool
    #: True when every call is fast and never sleeps, so the server may run it on the
    #: connection thread; False means it may block and belongs on a worker thread.
    inline: bool

    def direct_access(self) -> DirectAccess | None:
        """How the server may do reads and writes without calling this object, or None.

        Only storages served inline offer it; a filter never does (its methods are the point).
        """
        ...

    def preadv(self, bufs: list[memoryview], offset: int) -> None:
        """Fill exactly ``sum(len(b) for b in bufs)`` bytes from ``offset``, or raise."""
        ...

    def pwritev(self, bufs: list[memoryview], offset: int, fua: bool) -> None:
        """Write all of ``bufs`` at ``offset``; with ``fua`` the data is durable on return."""
        ...

    def flush(self) -> None:
        """Make every completed write durable."""
        ...

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Hint that a range is unused; its content becomes unspecified (here: zero)."""
        ...

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool, fua: bool) -> None:
        """Make a range read as zeroes.

        ``may_trim`` allows punching a hole; ``fast_only`` demands that the zeroing be
        genuinely fast, else :class:`~blkback.errors.UnsupportedError` is raised and nothing
        changes.
        """
        ...

    def cache(self, offset: int, length: int) -> None:
        """Hint that a range will be read soon."""
        ...

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Return ``(length, flags)`` runs from ``offset``: a non-empty prefix of the range."""
        ...

    def close(self) -> None:
        """Release the backend; no call may be in flight or follow."""
        ...


class Capabilities:
    """The capability flags every backend of this package has, declared once.

    All features, no writes (trim, zero, fast zero) on a read-only export; one storage object
    serves every connection of the export, so FLUSH on one covers writes made on all
    (CAN_MULTI_CONN).
    """

    readonly: bool
    can_flush: bool
    can_fua: bool
    can_trim: bool
    can_zero: bool
    can_fast_zero: bool
    can_cache: bool
    can_extents: bool
    can_multi_conn: bool
    inline: bool

    def set_capabilities(self, *, readonly: bool, inline: bool) -> None:
        """Set the flags for a read-only or writable export, served inline or not."""
        self.readonly = readonly
        self.can_flush = True
        self.can_fua = True
        self.can_trim = not readonly
        self.can_zero = not readonly
        self.can_fast_zero = not readonly
        self.can_cache = True
        self.can_extents = True
        self.can_multi_conn = True
        self.inline = inline

    def direct_access(self) -> DirectAccess | None:
        """No direct access unless a backend declares one (see :class:`Storage`)."""
        return None


def buffers_length(bufs: Sequence[memoryview]) -> int:
    """Total byte length of a list of buffers."""
    return sum(map(len, bufs))


def check_read_range(size: int, offset: int, length: int, what: str) -> None:
    """Refuse a non-writing request outside ``[0, size)`` with EINVAL.

    Args:
        size: The storage size in bytes.
        offset: First byte of the request.
        length: Its length in bytes.
        what: The operation, for the message.

    Raises:
        InvalidRequestError: The range is negative or runs past ``size``.
    """
    if offset < 0 or length < 0 or offset + length > size:
        raise InvalidRequestError(
            f"{what} of {length} bytes at offset {offset} is outside the export (size {size})"
        )


def check_write_range(size: int, offset: int, length: int, what: str) -> None:
    """Refuse a writing request outside ``[0, size)``: ENOSPC past the end (NBD SHOULD).

    Args:
        size: The storage size in bytes.
        offset: First byte of the request.
        length: Its length in bytes.
        what: The operation, for the message.

    Raises:
        InvalidRequestError: A negative offset or length.
        NoSpaceError: The range runs past ``size``.
    """
    if offset < 0 or length < 0:
        raise InvalidRequestError(f"{what}: negative offset {offset} or length {length}")
    if offset + length > size:
        raise NoSpaceError(
            f"{what} of {length} bytes at offset {offset} runs past the end (size {size})"
        )


def refuse_readonly(readonly: bool, what: str) -> None:
    """Raise :class:`ReadOnlyError` (EPERM) for a modifying request on a read-only export."""
    if readonly:
        raise ReadOnlyError(f"{what}: the export is read-only")


def os_error(exc: OSError, what: str) -> RequestError:
    """Map an ``OSError`` to the request error the client should see.

    ENOSPC, EDQUOT and EFBIG become ``ENOSPC`` (NBD asks for it on a full disk); EROFS
    becomes ``EPERM`` (the filesystem was remounted read-only under us); everything else,
    EIO included, becomes ``EIO``. The caller writes ``raise os_error(exc, ...) from exc``.

    Args:
        exc: The error raised by the system call.
        what: The operation and where, for the message.

    Returns:
        The exception to raise.
    """
    text = f"{what}: {exc.strerror or exc}"
    if exc.errno in _NO_SPACE_ERRNOS:
        return NoSpaceError(text)
    if exc.errno == errno.EROFS:
        return ReadOnlyError(text)
    return StorageIOError(text)


def format_size(n: int) -> str:
    """Human-readable binary size: ``1 GiB``, ``1.5 MiB``, ``512 B``."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.2f} {unit}"
    return f"{n} B"
