"""No import loop among the project's modules, ``TYPE_CHECKING`` blocks and function-level imports included.

Every module of ``engine/`` and ``venues/`` is parsed with :mod:`ast` (nothing is imported). Each import becomes
an edge to the project module it names: ``import a.b`` and ``from a.b import name`` name ``a.b``, ``from a import
b`` names the submodule ``a.b`` when there is one, relative imports are resolved against the importing module, and
``importlib.import_module("a.b")`` with a literal name counts too. Importing a submodule also runs its package's
``__init__``, but that implicit edge is left out: every package would otherwise loop with its own submodules.
The strongly connected components of that graph with more than one module are the import loops.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "venues")


@dataclass(frozen=True, order=True)
class Edge:
    """One import statement: ``source`` imports ``target`` at ``line``, ``where`` tells the kind of place."""

    source: str
    target: str
    line: int
    where: str  # "module", "function" or "TYPE_CHECKING"

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line}, {self.where})"


Graph = Mapping[str, Mapping[str, list[Edge]]]


def project_modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the given package folders."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _placed(tree: ast.AST) -> Iterator[tuple[ast.AST, str]]:
    """Every node with the kind of place it sits in; a TYPE_CHECKING block wins over a function."""
    stack: list[tuple[ast.AST, str]] = [(tree, "module")]
    while stack:
        node, where = stack.pop()
        yield node, where
        for child in ast.iter_child_nodes(node):
            child_where = where
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) and where == "module":
                child_where = "function"
            if isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
                child_where = "TYPE_CHECKING"
            stack.append((child, child_where))


def _deepest(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is a project module (``a.b.C`` -> ``a.b``), if any."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    anchor = package[: len(package) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def _import_module_literal(node: ast.Call) -> str | None:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in {"import_module", "__import__"} or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imports_of(module: str, path: Path, modules: Mapping[str, Path]) -> list[Edge]:
    """The project modules ``module`` imports, wherever the import statement sits."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    edges: list[Edge] = []

    def add(target: str | None, node: ast.stmt | ast.expr, where: str) -> None:
        if target is not None and target != module:
            edges.append(Edge(module, target, node.lineno, where))

    for node, where in _placed(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_deepest(alias.name, modules), node, where)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, module, is_package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in modules else _deepest(base, modules), node, where)
        elif isinstance(node, ast.Call):
            literal = _import_module_literal(node)
            if literal is not None:
                add(_deepest(literal, modules), node, where)
    return edges


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, dict[str, list[Edge]]]:
    """source module -> target module -> the import statements that make the edge."""
    modules = project_modules(root, packages)
    graph: dict[str, dict[str, list[Edge]]] = {name: {} for name in modules}
    for name, path in modules.items():
        for edge in imports_of(name, path, modules):
            graph[name].setdefault(edge.target, []).append(edge)
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm, iterative; only components of two modules or more (self-imports are dropped)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def shortest_loop(graph: Graph, component: list[str]) -> list[str]:
    """One shortest import loop through the component's first module, as module names (first == last)."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph[node]):
            if succ not in members:
                continue
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if succ not in previous:
                previous[succ] = node
                queue.append(succ)
    raise AssertionError(f"{component} is not strongly connected")


def describe(graph: Graph, components: list[list[str]]) -> str:
    """The loops, each with one shortest cycle and every import statement between its members."""
    lines: list[str] = []
    for component in components:
        members = set(component)
        lines.append(f"import loop of {len(component)} modules: {', '.join(component)}")
        lines.append("  shortest cycle: " + " -> ".join(shortest_loop(graph, component)))
        for source in component:
            for target in sorted(set(graph[source]) & members):
                lines.extend(f"    {edge}" for edge in graph[source][target])
    return "\n".join(lines)


def _components_touching(package: str) -> tuple[Graph, list[list[str]]]:
    graph = import_graph(ROOT, PACKAGES)
    inside = [
        component
        for component in strongly_connected(graph)
        if any(name == package or name.startswith(package + ".") for name in component)
    ]
    return graph, inside


def test_the_walker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """Loops hidden under TYPE_CHECKING, inside functions, behind ``from pkg import sub``, relative imports and
    ``importlib.import_module`` are all found; a module that only imports from the loop is not part of it."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg import a\n",
        "a.py": "import pkg.b\n",
        "b.py": "def late() -> None:\n    from pkg.c import thing\n",
        "c.py": (
            "from typing import TYPE_CHECKING\nthing = 1\nif TYPE_CHECKING:\n    from pkg import a\n"
            "else:\n    import json\n"
        ),
        "d.py": "from . import e\nfrom pkg import a\n",
        "e.py": "import importlib\nimportlib.import_module('pkg.d')\n",
        "sub/__init__.py": "from ..sub import f\n",
        "sub/f.py": "from .. import d\nfrom . import g\n",
        "sub/g.py": "from pkg.sub.f import name\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(tmp_path, ["pkg"])
    assert strongly_connected(graph) == [
        ["pkg.a", "pkg.b", "pkg.c"],
        ["pkg.d", "pkg.e"],
        ["pkg.sub.f", "pkg.sub.g"],
    ]
    assert [edge.where for edge in graph["pkg.c"]["pkg.a"]] == ["TYPE_CHECKING"]
    assert [edge.where for edge in graph["pkg.b"]["pkg.c"]] == ["function"]
    assert "json" not in graph["pkg.c"]  # not a project module
    report = describe(graph, strongly_connected(graph))
    assert "shortest cycle: pkg.a -> pkg.b -> pkg.c -> pkg.a" in report
    assert "pkg.c -> pkg.a (line 4, TYPE_CHECKING)" in report


def test_the_walker_reads_the_real_tree() -> None:
    """The graph of this repository is not empty: the no-loop tests below cannot pass by seeing nothing."""
    graph = import_graph(ROOT, PACKAGES)
    assert len(graph) > 60
    assert "venues.simulator.admin" in graph["venues.simulator.server"]
    assert "venues.base" in graph["engine.crypto"]
    assert "venues.http" in graph["venues.binance"]


def test_no_import_loop_in_venues() -> None:
    graph, loops = _components_touching("venues")
    assert not loops, "\n" + describe(graph, loops)


def test_no_import_loop_in_engine() -> None:
    graph, loops = _components_touching("engine")
    assert not loops, "\n" + describe(graph, loops)
