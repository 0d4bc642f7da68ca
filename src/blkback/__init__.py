"""blkback: a userspace NBD block backend with xen-blkback page pools and the squeeze."""

from __future__ import annotations

__version__ = "0.1.0"

from blkback import _native

_native.install()
