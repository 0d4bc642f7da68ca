"""Discrete-event simulation of Xen hosts running blkback's core (``blkback sim``).

The simulator runs the real core objects (``Bus``, ``Device``, ``Ring``, ``PagePool``,
``Params``, the squeeze policies) on a virtual clock with counted pages; it models only what
surrounds them: dom0's memory and reclaim (:mod:`.host`), the guests and their volumes
(:mod:`.guest`). Nothing in this package reads a wall clock except the CLI's progress and
profile reporting (:mod:`.command`).
"""

from __future__ import annotations
