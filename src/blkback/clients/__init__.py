"""Small real NBD clients used by benchmarks, experiments and tests.

They run under Debian's ``/usr/bin/python3``, which has libnbd's ``nbd`` module (the
project's virtualenv does not): call :func:`libnbd_python` for the interpreter and
:data:`HOLD_SCRIPT` for the script path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from blkback.errors import EnvironmentProblem

HOLD_SCRIPT = str(Path(__file__).with_name("libnbd_hold.py"))


def libnbd_python() -> str:
    """The interpreter that can ``import nbd`` (Debian's python3 with python3-libnbd)."""
    for candidate in ("/usr/bin/python3",):
        if Path(candidate).exists():
            return candidate
    found = shutil.which("python3")
    if found is None:
        raise EnvironmentProblem("no python3 with libnbd's nbd module (install python3-libnbd)")
    return found
