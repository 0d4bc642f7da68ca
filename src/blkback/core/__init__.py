"""The pure core: page pools, rings, devices, the squeeze and runtime parameters.

Rule: nothing in this package imports asyncio, socket, select, threading or time, and nothing
reads a wall clock. Time comes in through a :class:`~blkback.clock.Clock`; memory comes
from an injected :class:`~blkback.core.pages.PageAllocator`. The same objects run in the server
(real clock, real mmap pages) and in the simulator (virtual clock, counted pages).
"""

from __future__ import annotations
