"""The import graph of the project: no cycles, and dependencies that point one way.

DESIGN.md: ``attribution`` ← ``unlearn``; ``analysis`` may use ``attribution``;
``excise`` uses all three; ``benchmarks`` consumes them; no library imports
``benchmarks`` or ``tests``; no import cycles. The imports are read statically with
``ast`` (nothing is imported): module-level and function-level ``import`` and
``from … import``, relative imports resolved against the importing module. Imports in
the body of ``if TYPE_CHECKING:`` never run and do not count.

Edges are between modules: ``from pkg import name`` is an edge to the module
``pkg.name`` when there is one, else to ``pkg`` (its ``__init__``); ``import a.b`` is an
edge to ``a.b``. Running a parent package's ``__init__`` on the way to a submodule is
not counted as an edge.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("attribution", "unlearn", "analysis", "excise", "benchmarks")
PROJECT = (*SCANNED, "tests")
LIBRARIES = ("attribution", "unlearn", "analysis")
ALLOWED = {  # top-level package → the project packages its modules may import
    "attribution": {"attribution"},
    "unlearn": {"attribution", "unlearn"},
    "analysis": {"attribution", "analysis"},
    "excise": {*LIBRARIES, "excise"},
    "benchmarks": {*LIBRARIES, "excise", "benchmarks"},
}


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` (both dotted module names) at ``where`` (file:line)."""

    source: str
    target: str
    where: str

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.where})"


# --------------------------------------------------------------------------- reading


def discover(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file under ``packages``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _import_nodes(node: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth, outside ``if TYPE_CHECKING:``."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children: Iterable[ast.AST] = node.orelse
    else:
        children = ast.iter_child_nodes(node)
    for child in children:
        yield from _import_nodes(child)


def _known_prefix(name: str, known: Mapping[str, Path]) -> str:
    """The longest prefix of ``name`` that is a known module (``name`` itself if none)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return name


def module_imports(
    module: str, path: Path, known: Mapping[str, Path], project: Iterable[str], root: Path
) -> list[Edge]:
    """The project modules that ``module`` (read from ``path``) imports."""
    project = set(project)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges = []
    for node in _import_nodes(tree):
        where = f"{path.relative_to(root).as_posix()}:{node.lineno}"
        if isinstance(node, ast.Import):
            targets = [_known_prefix(alias.name, known) for alias in node.names]
        else:
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            targets = []
            for alias in node.names:
                child = f"{base}.{alias.name}"
                targets.append(child if child in known else _known_prefix(base, known))
        for target in targets:
            if target.split(".")[0] in project and target != module:
                edges.append(Edge(module, target, where))
    return edges


def import_graph(
    root: Path, scanned: Iterable[str] = SCANNED, project: Iterable[str] = PROJECT
) -> list[Edge]:
    """Every import edge from a module of ``scanned`` to a module of ``project``."""
    known = discover(root, project)
    scanned = set(scanned)
    edges = []
    for module, path in known.items():
        if module.split(".")[0] in scanned:
            edges.extend(module_imports(module, path, known, project, root))
    return edges


# --------------------------------------------------------------------------- checking


def _components(graph: Mapping[str, set[str]]) -> list[set[str]]:
    """Strongly connected components (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                found.append(component)
    return found


def _shortest_cycle(graph: Mapping[str, set[str]], start: str, within: set[str]) -> list[str]:
    """The shortest path start → … → start inside ``within`` (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in within:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parent:
                    parent[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is on no cycle")  # only called inside a component


def find_cycles(edges: Iterable[Edge]) -> list[list[Edge]]:
    """Import cycles as lists of edges: for every module on a cycle, a shortest one.

    Cycles that are rotations of one another are reported once.
    """
    edges = list(edges)
    graph: dict[str, set[str]] = {}
    first: dict[tuple[str, str], Edge] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
        first.setdefault((edge.source, edge.target), edge)
    cycles, seen = [], set()
    for component in _components(graph):
        if len(component) < 2:
            continue
        for start in sorted(component):
            path = _shortest_cycle(graph, start, component)
            key = frozenset(itertools.pairwise(path))
            if key not in seen:
                seen.add(key)
                cycles.append([first[pair] for pair in itertools.pairwise(path)])
    return cycles


def layering_violations(
    edges: Iterable[Edge], allowed: Mapping[str, set[str]] = ALLOWED
) -> list[Edge]:
    """Edges from a package to a project package it may not import."""
    bad = []
    for edge in edges:
        source, target = edge.source.split(".")[0], edge.target.split(".")[0]
        if target not in allowed.get(source, set()):
            bad.append(edge)
    return bad


def describe_cycle(cycle: list[Edge]) -> str:
    return " -> ".join([cycle[0].source, *(f"{e.target} [{e.where}]" for e in cycle)])


# --------------------------------------------------------------------------- the tests


def test_the_project_has_no_import_cycles():
    cycles = find_cycles(import_graph(ROOT))
    assert not cycles, "import cycles (each edge with where it is imported):\n" + "\n".join(
        describe_cycle(c) for c in cycles
    )


def test_imports_follow_the_layering():
    bad = layering_violations(import_graph(ROOT))
    assert not bad, "imports against the layering of DESIGN.md:\n" + "\n".join(map(str, bad))


def test_the_scan_sees_the_whole_project():
    """Guards against a vacuous pass: known modules and known edges are found."""
    modules = discover(ROOT, SCANNED)
    for name in ("attribution", "attribution.task", "unlearn.proof", "analysis.audit"):
        assert name in modules
    assert "excise.commands.forget" in modules and "benchmarks.common" in modules
    pairs = {(e.source, e.target) for e in import_graph(ROOT)}
    assert ("unlearn.proof", "attribution.fingerprint") in pairs  # module level
    assert ("unlearn.proof", "unlearn.scope") in pairs
    assert {e.source.split(".")[0] for e in import_graph(ROOT)} == set(SCANNED)


def test_the_reader_sees_every_kind_of_import(tmp_path):
    files = {
        "pkg/__init__.py": "from pkg.a import thing\nfrom . import b\n",
        "pkg/a.py": (
            "from __future__ import annotations\n"
            "import os\n"
            "import torch.nn\n"
            "from typing import TYPE_CHECKING\n"
            "import typing\n"
            "if TYPE_CHECKING:\n"
            "    from pkg import hidden\n"
            "else:\n"
            "    from pkg.sub import leaf\n"
            "if typing.TYPE_CHECKING:\n"
            "    import other.x\n"
            "def f():\n"
            "    from .b import name\n"
            "    return name\n"
            "class C:\n"
            "    def method(self):\n"
            "        import other.deep.module as m\n"
            "        try:\n"
            "            from pkg import thing_in_init\n"
            "        except ImportError:\n"
            "            pass\n"
        ),
        "pkg/b.py": "",
        "pkg/hidden.py": "",
        "pkg/sub/__init__.py": "from .. import a\nfrom ..b import *\n",
        "pkg/sub/leaf.py": "from .. import b\n",
        "other/__init__.py": "",
        "other/x.py": "",
        "other/deep/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = import_graph(tmp_path, scanned=("pkg",), project=("pkg", "other"))
    found = {(e.source, e.target, e.where) for e in edges}
    assert found == {
        ("pkg", "pkg.a", "pkg/__init__.py:1"),
        ("pkg", "pkg.b", "pkg/__init__.py:2"),
        ("pkg.a", "pkg.sub.leaf", "pkg/a.py:9"),  # the else branch of TYPE_CHECKING runs
        ("pkg.a", "pkg.b", "pkg/a.py:13"),  # relative, in a function
        ("pkg.a", "other.deep", "pkg/a.py:17"),  # the deepest module that exists
        ("pkg.a", "pkg", "pkg/a.py:19"),  # a name of the package's __init__
        ("pkg.sub", "pkg.a", "pkg/sub/__init__.py:1"),  # relative from a package
        ("pkg.sub", "pkg.b", "pkg/sub/__init__.py:2"),
        ("pkg.sub.leaf", "pkg.b", "pkg/sub/leaf.py:1"),  # two dots climb to pkg
    }
    cycles = find_cycles(edges)
    assert [[e.source for e in c] for c in cycles] == [["pkg", "pkg.a"]]


def test_the_checker_reports_a_synthetic_cycle_and_violation():
    """Negative control: a graph with known faults must be reported, a clean one must not."""
    edges = [
        Edge("unlearn.loop", "unlearn.newton", "unlearn/loop.py:10"),
        Edge("unlearn.newton", "unlearn.loop", "unlearn/newton.py:3"),
        Edge("analysis.a", "analysis.b", "analysis/a.py:1"),
        Edge("analysis.b", "analysis.c", "analysis/b.py:1"),
        Edge("analysis.c", "analysis.a", "analysis/c.py:1"),
        Edge("attribution.task", "unlearn.scope", "attribution/task.py:7"),  # upward
        Edge("analysis.a", "attribution.task", "analysis/a.py:2"),  # allowed
        Edge("excise.cli", "unlearn.loop", "excise/cli.py:1"),  # allowed
        Edge("unlearn.loop", "tests.helpers", "unlearn/loop.py:20"),  # never
    ]
    cycles = {describe_cycle(c) for c in find_cycles(edges)}
    assert cycles == {
        "unlearn.loop -> unlearn.newton [unlearn/loop.py:10] -> unlearn.loop [unlearn/newton.py:3]",
        "analysis.a -> analysis.b [analysis/a.py:1] -> analysis.c [analysis/b.py:1]"
        " -> analysis.a [analysis/c.py:1]",
    }
    assert [str(e) for e in layering_violations(edges)] == [
        "attribution.task -> unlearn.scope (attribution/task.py:7)",
        "unlearn.loop -> tests.helpers (unlearn/loop.py:20)",
    ]
    clean = [e for e in edges if e.where not in {"unlearn/newton.py:3", "analysis/c.py:1"}]
    assert find_cycles(clean) == []
    rules = [
        ("analysis.x", "unlearn.scope"),
        ("unlearn.x", "analysis.audit"),
        ("attribution.x", "excise.cli"),
        ("excise.cli", "benchmarks.common"),
        ("unlearn.x", "excise"),
    ]
    assert len(layering_violations([Edge(s, t, "-") for s, t in rules])) == len(rules)
