"""The real clock (kept out of ``core/``, which never reads time)."""

from __future__ import annotations

import time


class MonotonicClock:
    """``time.monotonic_ns`` as a :class:`~blkback.core.clock.Clock`."""

    def now_ns(self) -> int:
        return time.monotonic_ns()
