"""A plain ``pip install .`` into a fresh virtualenv gives every command the README lists.

The repository is copied (so that the build leaves nothing in the checkout) and installed
with pip as a user would: pip's own configuration decides where packages come from (PyPI on
a fresh machine; a local wheel cache when one is configured). Then the commands of the
issue's "done when" run and must end without a traceback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, need_tool

pytestmark = pytest.mark.slow

IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache",
    ".ruff_cache", ".pytest_cache", "tests",
)  # fmt: skip


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    shown = f"{cmd}\nstdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-4000:]}"
    assert res.returncode == 0, shown
    assert "Traceback" not in res.stderr, shown
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bin/`` of a fresh virtualenv with this checkout installed by ``pip install .``."""
    root = tmp_path_factory.mktemp("fresh")
    source = root / "blkback"
    shutil.copytree(REPO, source, ignore=IGNORED)
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], root)
    _run([str(venv / "bin" / "pip"), "install", "--quiet", "."], source, timeout=1200)
    return venv / "bin"


def test_help_of_repro_and_bench(installed: Path, tmp_path: Path) -> None:
    for command in ("repro", "bench"):
        out = _run([str(installed / "blkback"), command, "--help"], tmp_path).stdout
        assert out.startswith(f"usage: blkback {command}")


def test_sim_seed_writes_its_report_and_plots(installed: Path, tmp_path: Path) -> None:
    out = tmp_path / "seed"
    _run(
        [str(installed / "blkback"), "sim", "seed", "--out", str(out), "--sim-seconds", "5",
         "--no-extras", "--engine", "serial", "--quiet"],
        tmp_path,
    )  # fmt: skip
    assert (out / "report.md").stat().st_size > 0
    assert list(out.glob("*.png")), "no plot: matplotlib must come with the install"


def test_serve_run_nbdinfo(installed: Path, tmp_path: Path) -> None:
    need_tool("nbdinfo")
    res = _run(
        [
            str(installed / "blkback"),
            "serve",
            "--pressure",
            "off",
            "--run",
            'nbdinfo --json "$uri"',
        ],
        tmp_path,
    )
    assert '"export-size": 1073741824' in res.stdout
