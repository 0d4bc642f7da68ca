"""The package map of docs/design.md, enforced on the source tree.

Run as a script to print the import graph (``scripts/import-graph`` does that):

    .venv/bin/python tests/unit/test_layering.py            # packages of blkback
    .venv/bin/python tests/unit/test_layering.py core       # modules inside core/
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "blkback"
DESIGN = ROOT / "docs" / "design.md"
FORBIDDEN = {"asyncio", "socket", "select", "selectors", "threading", "time", "random"}

# The package map (docs/design.md, "Package map"): what each package or top-level module may
# import of blkback. Each layer may import the layers below it, never one above or beside it.
LEAVES = frozenset({"errors", "clock"})
BOTTOM = LEAVES | {"core", "protocol", "storage", "clients"}
SERVING = BOTTOM | {"pressure", "server"}
PACKAGE_MAP: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "clock": frozenset(),
    "core": LEAVES,
    "protocol": LEAVES,
    "storage": LEAVES,
    "clients": LEAVES,
    "pressure": LEAVES | {"core"},
    "server": LEAVES | {"core", "protocol", "storage", "pressure"},
    # Terminal progress bars for the long-running commands (rich); imports nothing of ours.
    "progress": frozenset(),
    "hostenv": SERVING,
    "sim": SERVING | {"progress"},
    "bench": SERVING | {"hostenv", "progress"},
    "repro": SERVING | {"hostenv", "progress"},
    # The command line loads every command module by name (importlib), at the very top.
    "cli": LEAVES,
    "__main__": frozenset({"cli"}),
    # Which hot modules load compiled (mypyc) or from source; imports nothing of ours.
    "_native": frozenset(),
    "__init__": frozenset({"_native"}),
}


def _unit(path: Path) -> str:
    """The package a source file belongs to (``core``), or its module name at the top."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return parts[0]


def _module(path: Path) -> str:
    """The dotted name of a source file (``blkback.core.ring``)."""
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: Path) -> Iterator[str]:
    """Every module a file imports: top-level, in functions and under TYPE_CHECKING alike."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module(path).split(".") if path.is_relative_to(SRC) else [""]
    if path.name != "__init__.py":
        package.pop()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield module
            # `from blkback.core import ring` imports the module blkback.core.ring.
            yield from (f"{module}.{alias.name}" for alias in node.names)


def _imports(path: Path) -> set[str]:
    """The top-level names of the modules a file imports (``time``, ``blkback``)."""
    return {name.split(".")[0] for name in _imported_modules(path)}


def _time_uses(path: Path) -> set[str]:
    """What a file uses of the ``time`` module: ``time.X`` and ``from time import X`` names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name == "time"
    }
    uses: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "time" and not node.level:
            uses.update(alias.name for alias in node.names)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            uses.add(node.attr)
    return uses


def _is_unit(name: str) -> bool:
    """Whether ``blkback.<name>`` is a package or a top-level module (not an attribute)."""
    return (SRC / name).is_dir() or (SRC / f"{name}.py").exists()


def sources() -> list[Path]:
    """Every source file of the package."""
    return sorted(SRC.rglob("*.py"))


def package_graph() -> dict[str, set[str]]:
    """Package (or top module) -> the other blkback packages it imports."""
    graph: dict[str, set[str]] = {}
    for path in sources():
        unit = _unit(path)
        edges = graph.setdefault(unit, set())
        for name in _imported_modules(path):
            parts = name.split(".")
            if parts[0] == "blkback" and len(parts) > 1 and _is_unit(parts[1]):
                edges.add(parts[1])
        edges.discard(unit)
    return graph


def module_graph(package: str) -> dict[str, set[str]]:
    """Module -> the other modules of the same package it imports."""
    files = {_module(p): p for p in (SRC / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        graph[name] = {m for m in _imported_modules(path) if m in files and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("package", ["core", "protocol"])
def test_pure_packages_do_no_io(package: str) -> None:
    """core/ and protocol/ never import event loops, sockets, threads, clocks or randomness."""
    files = list((SRC / package).rglob("*.py"))
    assert files, f"no sources found in {package}/"
    offenders = {str(p.relative_to(SRC)): sorted(_imports(p) & FORBIDDEN) for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


# The serving layers and the experiments read and wait for time only through a
# blkback.clock.Clock.
CLOCKED = ("core", "protocol", "storage", "clients", "pressure", "server", "repro")
# server/connection.py is being split (issue 12); it moves to its server's clock with it.
NOT_YET_CLOCKED: set[str] = set()
# Files of those packages that keep `time` on purpose: exactly what they use of it, and why.
KEEPS_TIME: dict[str, tuple[frozenset[str], str]] = {
    "repro/guest.py": (
        frozenset({"monotonic"}),
        "a child program run by Debian's python3 (for libnbd); it imports nothing of blkback",
    ),
    "repro/runner.py": (
        frozenset({"time"}),
        "results.json's host snapshots carry the Unix time they were taken at",
    ),
    "repro/vmimage.py": (
        frozenset({"time"}),
        "an image's age is the Unix time now minus its directory's mtime",
    ),
}


def _clock_offenders(
    files: dict[str, Path], keeps: dict[str, tuple[frozenset[str], str]]
) -> dict[str, list[str]]:
    """File -> what it uses of ``time`` beyond its exemption in ``keeps`` (if it has one)."""
    out: dict[str, list[str]] = {}
    for name, path in files.items():
        if "time" not in _imports(path) or name in NOT_YET_CLOCKED:
            continue
        if name not in keeps:
            out[name] = ["import time", *sorted(_time_uses(path))]
        elif extra := sorted(_time_uses(path) - keeps[name][0]):
            out[name] = extra
    return out


def test_time_comes_only_from_a_clock() -> None:
    """No time.sleep / time.monotonic in the serving layers and repro/: they use a Clock."""
    files = {
        str(p.relative_to(SRC)): p for package in CLOCKED for p in (SRC / package).rglob("*.py")
    }
    assert _clock_offenders(files, KEEPS_TIME) == {}


def test_every_exemption_from_the_clock_is_still_needed() -> None:
    """Each file in KEEPS_TIME uses exactly what it is allowed of ``time``, and says why."""
    for name, (allowed, why) in KEEPS_TIME.items():
        assert why
        assert name.split("/")[0] in CLOCKED, name
        assert _time_uses(SRC / name) == allowed, name


def test_the_clock_rule_detects_a_violation(tmp_path: Path) -> None:
    """A sleep is caught, also under an alias, and so is a use beyond an exemption."""
    files = {name: tmp_path / name for name in ("bad.py", "ok.py", "greedy.py")}
    files["bad.py"].write_text("import time as t\nt.sleep(1)\nx = t.monotonic()\n")
    files["ok.py"].write_text("from time import time\nx = time()\n")
    files["greedy.py"].write_text("import time\nx = time.time()\ntime.sleep(1)\n")
    keeps = {n: (frozenset({"time"}), "wall clock") for n in ("ok.py", "greedy.py")}
    assert _clock_offenders(files, keeps) == {
        "bad.py": ["import time", "monotonic", "sleep"],
        "greedy.py": ["sleep"],
    }


@pytest.mark.parametrize("package", ["core", "protocol", "storage", "pressure", "server", "sim"])
def test_no_import_circle_inside_a_package(package: str) -> None:
    """Modules of a package import one another one way (in core: device -> ring, policy)."""
    graph = module_graph(package)
    assert graph, f"no modules found in {package}/"
    assert cycles(graph) == []


def test_the_squeeze_flows_down_in_core() -> None:
    """The device uses its rings and the policy; neither of them imports the device."""
    graph = module_graph("core")
    assert {"blkback.core.ring", "blkback.core.policy"} <= graph["blkback.core.device"]
    assert "blkback.core.device" not in graph["blkback.core.ring"] | graph["blkback.core.policy"]
    assert "blkback.core.ring" not in graph["blkback.core.policy"]


def violations(
    graph: dict[str, set[str]], allowed: dict[str, frozenset[str]]
) -> dict[str, list[str]]:
    """Imports the map does not allow, by importer; an importer missing from the map is one."""
    out: dict[str, list[str]] = {}
    for unit, imported in graph.items():
        if unit not in allowed:
            out[unit] = ["<not in the package map: add it to docs/design.md and PACKAGE_MAP>"]
        elif bad := sorted(imported - allowed[unit]):
            out[unit] = bad
    return out


def test_every_package_imports_only_what_the_map_allows() -> None:
    """The package map, enforced (TYPE_CHECKING and function-level imports count too)."""
    graph = package_graph()
    assert {"core", "protocol", "storage", "pressure", "server"} <= set(graph)
    assert violations(graph, PACKAGE_MAP) == {}


def test_no_import_circle_between_packages() -> None:
    assert cycles(package_graph()) == []


def test_the_map_check_detects_a_violation() -> None:
    graph = {"core": {"clock", "server"}, "newpkg": set()}
    assert violations(graph, PACKAGE_MAP) == {
        "core": ["server"],
        "newpkg": ["<not in the package map: add it to docs/design.md and PACKAGE_MAP>"],
    }


def design_map() -> dict[str, frozenset[str]]:
    """The table under "Package map" in docs/design.md: ``| `pkg` | `a`, `b` |`` rows."""
    text = DESIGN.read_text()
    section = text.split("## Package map", 1)[1].split("\n## ", 1)[0]
    table: dict[str, frozenset[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`"):
            names = {c.strip().strip("`") for c in cells[1].split(",")} - {"nothing", ""}
            table[cells[0].strip("`")] = frozenset(names)
    return table


def test_the_design_document_shows_the_enforced_map() -> None:
    """docs/design.md's table and PACKAGE_MAP are the same map."""
    assert design_map() == PACKAGE_MAP


def test_cycles_are_found() -> None:
    """The cycle finder sees a circle of three and ignores a chain."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def print_graph(graph: dict[str, set[str]]) -> None:
    """One line per node: ``node -> a, b``; then any circles."""
    width = max(map(len, graph), default=0)
    for node in sorted(graph):
        print(f"{node:<{width}} -> {', '.join(sorted(graph[node])) or '-'}")
    for circle in cycles(graph):
        print(f"circle: {' <-> '.join(circle)}")


if __name__ == "__main__":
    print_graph(module_graph(sys.argv[1]) if len(sys.argv) > 1 else package_graph())
