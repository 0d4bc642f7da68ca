"""The layering rules of design.md, enforced on the source tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "blkback"
FORBIDDEN = {"asyncio", "socket", "select", "selectors", "threading", "time", "random"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ["core", "protocol"])
def test_pure_packages_do_no_io(package: str) -> None:
    """core/ and protocol/ never import event loops, sockets, threads, clocks or randomness."""
    files = [p for p in (SRC / package).rglob("*.py") if p.name != "microbench.py"]
    if package == "core":
        assert files, "no sources found in core/"
    elif not files:
        pytest.skip(f"{package}/ has no sources yet")
    offenders = {str(p.relative_to(SRC)): sorted(_imports(p) & FORBIDDEN) for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_rule_detects_a_violation(tmp_path: Path) -> None:
    """The checker itself is not vacuous."""
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom socket import socket\n")
    assert _imports(bad) & FORBIDDEN == {"time", "socket"}
