"""The hot modules compiled with mypyc, and the switch back to their Python source.

``scripts/build-native`` compiles :data:`COMPILED` with mypyc (the code is ``mypy --strict``)
into extension modules beside their sources; Python then imports those instead of the
``.py`` files. The source stays the one truth: the compiled modules are the same code, and
the pure-Python path must pass the same tests (``scripts/check`` runs both).

The source is used instead, for every module of :data:`COMPILED` at once (they call each
other natively, so they are compiled or not together), when:

* ``BLKBACK_PURE_PYTHON=1`` is set, or
* any of their sources is newer than its compiled module (an edit not yet rebuilt: running
  stale compiled code would be a silent lie).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

#: The modules of the ring's data path, by measurement (docs/data-path.md).
COMPILED: tuple[str, ...] = (
    "blkback.core.device",
    "blkback.core.params",
    "blkback.core.pages",
    "blkback.core.policy",
    "blkback.core.polling",
    "blkback.core.pool",
    "blkback.core.ring",
    "blkback.protocol.transmission",
    "blkback.server.direct_io",
    "blkback.storage.direct",
    "blkback.storage.region",
    "blkback.server.connection",
)

_SRC = Path(__file__).resolve().parent.parent


def _source(name: str) -> Path:
    return _SRC.joinpath(*name.split(".")).with_suffix(".py")


def _compiled(name: str) -> Path | None:
    source = _source(name)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_suffix(suffix)
        if candidate.exists():
            return candidate
    return None


def compiled_modules_in_use() -> bool:
    """Whether the compiled modules are present, current, and not switched off."""
    if os.environ.get("BLKBACK_PURE_PYTHON") == "1":
        return False
    for name in COMPILED:
        built = _compiled(name)
        if built is None or built.stat().st_mtime < _source(name).stat().st_mtime:
            return False
    return True


class _SourceFinder:
    """Finds the ``.py`` source of the compiled modules (a ``sys.meta_path`` entry)."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(name, _source(name))


def install() -> None:
    """Make the compiled modules load from source unless they are current and wanted."""
    if any(_compiled(n) is not None for n in COMPILED) and not compiled_modules_in_use():
        sys.meta_path.insert(0, _SourceFinder())
