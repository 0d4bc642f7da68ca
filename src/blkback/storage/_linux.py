"""Linux calls the ``os`` module lacks: ``fallocate(2)`` with its hole-punching modes.

``os.posix_fallocate`` only allocates; punching holes and zeroing ranges need the raw
``fallocate`` from libc, called through ctypes (a foreign call releases the GIL, like
``os.preadv`` does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable
from typing import Final

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10

#: errnos meaning "this filesystem (or file type) does not do that fallocate mode".
UNSUPPORTED_ERRNOS: Final = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV})


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        func = ctypes.CDLL(name, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    typed: Callable[[int, int, int, int], int] = func
    return typed


_fallocate = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call ``fallocate(fd, mode, offset, length)``.

    Args:
        fd: An open file descriptor.
        mode: ``FALLOC_FL_*`` flags (0 allocates).
        offset: First byte.
        length: Number of bytes (must be > 0).

    Raises:
        OSError: The call failed; ``EOPNOTSUPP`` when libc has no ``fallocate``.
    """
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available in this libc")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
