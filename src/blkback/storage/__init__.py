"""Storage backends and filters: where an export's bytes live.

Backends: ``file:PATH[:SIZE]`` (regular file or block device; O_DIRECT where aligned),
``memory:SIZE`` (sparse memfd RAM disk), ``null:SIZE`` (discard writes, read zeroes).
Filters (``delay``, ``rate``, ``error``) wrap any backend to emulate slow or failing
network-backed volumes. :func:`open_storage` builds a stack from a spec string such as
``memory:1G,delay=10ms,rate=40M``; see :mod:`blkback.storage.spec` for the syntax and
:mod:`blkback.storage.base` for the :class:`Storage` interface and its threading rules.
"""

from __future__ import annotations

from .anon import AnonMemoryStorage
from .base import HOLE, ZERO, DirectAccess, PlainDescriptor, Storage
from .fd import FileStorage, MemoryStorage, open_file
from .filters import DelayFilter, ErrorFilter, RateFilter, StorageFilter
from .null import NullStorage
from .region import MemoryRegion
from .spec import StorageSpec, describe, open_storage, parse_duration_ns, parse_size, parse_spec

__all__ = [
    "HOLE",
    "ZERO",
    "AnonMemoryStorage",
    "DelayFilter",
    "DirectAccess",
    "ErrorFilter",
    "FileStorage",
    "MemoryRegion",
    "MemoryStorage",
    "NullStorage",
    "PlainDescriptor",
    "RateFilter",
    "Storage",
    "StorageFilter",
    "StorageSpec",
    "describe",
    "open_file",
    "open_storage",
    "parse_duration_ns",
    "parse_size",
    "parse_spec",
]
