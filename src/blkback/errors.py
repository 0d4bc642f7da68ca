"""Exception tree of blkback.

::

    BlkbackError
    ├── ConfigError            bad command line, export spec or parameter value
    │   └── ParamError         a runtime parameter write was refused (nothing changed)
    ├── NbdError               anything the NBD layer raises
    │   ├── ProtocolError      the peer broke the protocol: the connection is closed
    │   └── RequestError       one request fails: an error reply, the connection stays
    │       ├── InvalidRequestError   EINVAL
    │       ├── NoSpaceError          ENOSPC
    │       ├── ReadOnlyError         EPERM
    │       ├── UnsupportedError      ENOTSUP
    │       ├── StorageIOError        EIO
    │       └── OutOfMemoryError      ENOMEM (a page could not be allocated)
    ├── EnvironmentProblem     the host lacks a facility (root, cgroup, swap, tool)
    └── RuntimeFailure         something failed at run time: a busy address, no server

The command line exits 2 for a ConfigError (a usage error: fix the command) and 1 for every
other BlkbackError (the command was right, the world was not), as nbdkit and most tools do.

Request errors carry their NBD errno as a class attribute; the server translates them to
replies at one boundary.
"""

from __future__ import annotations

import errno as _errno
from typing import ClassVar


class BlkbackError(Exception):
    """Base class of every error blkback raises on purpose."""


class ConfigError(BlkbackError):
    """Bad configuration given by a user: the message is shown as is, without traceback."""


class ParamError(ConfigError):
    """A runtime parameter could not be read or written; nothing was changed."""


class EnvironmentProblem(BlkbackError):  # noqa: N818 (a condition of the host, not a bug)
    """The host lacks something an operation needs (root, cgroup, swap, a tool)."""


class RuntimeFailure(BlkbackError):  # noqa: N818 (a failed run, named as EnvironmentProblem)
    """The command was well formed but failed at run time (exit status 1, not 2)."""


class NbdError(BlkbackError):
    """Base of the NBD layer's errors."""


class ProtocolError(NbdError):
    """The peer broke the protocol; the connection must be closed."""


class RequestError(NbdError):
    """One request failed; the server answers with ``errno`` and keeps the connection."""

    errno: ClassVar[int] = _errno.EIO


class InvalidRequestError(RequestError):
    errno = _errno.EINVAL


class NoSpaceError(RequestError):
    errno = _errno.ENOSPC


class ReadOnlyError(RequestError):
    errno = _errno.EPERM


class UnsupportedError(RequestError):
    errno = _errno.ENOTSUP


class StorageIOError(RequestError):
    errno = _errno.EIO


class OutOfMemoryError(RequestError):
    errno = _errno.ENOMEM
