"""The compiled data path and its switch back to the Python source (blkback._native)."""

from __future__ import annotations

import os
import subprocess
import sys

from blkback import _native

PROBE = (
    "import blkback._native as n, importlib;"
    "print(n.compiled_modules_in_use(),"
    " *(importlib.import_module(m).__file__.endswith('.py') for m in n.COMPILED))"
)


def _probe(**env: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_the_pure_python_switch_loads_every_compiled_module_from_source() -> None:
    in_use, *from_source = _probe(BLKBACK_PURE_PYTHON="1")
    assert in_use == "False"
    assert from_source == ["True"] * len(_native.COMPILED)


def test_compiled_modules_are_used_all_together_or_not_at_all() -> None:
    in_use, *from_source = _probe(BLKBACK_PURE_PYTHON="0")
    # Built and current (scripts/build-native): all compiled; otherwise all from source.
    assert from_source == [str(in_use == "False")] * len(_native.COMPILED)
