"""The package's layering, read from the source with ``ast`` (nothing is imported).

- ``runtime/`` imports only the shared core (the modules directly in ``edgedistill/`` except the top-level
  commands), its own modules, the standard library and third-party packages;
- the core imports nothing from the stages or the top-level commands;
- no module imports a private (underscore) name from a module in another folder;
- no two modules import each other, directly or through others.

Every import counts, at module level and inside functions and classes; only those under ``if TYPE_CHECKING:`` are
left out of the cycle check (they never run). Imports by string (``importlib.import_module``) are not seen.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "edgedistill"
# The modules directly in edgedistill/ that are top-level commands, not shared core: they may import every stage.
COMMANDS = ("__main__", "cli", "pipeline", "report")
# The shared core, named one by one: a new module in edgedistill/ is a decision about layering, so it is added here
# (or to COMMANDS) on purpose. "edgedistill" itself is the package's __init__.
CORE = (
    "edgedistill",
    "edgedistill.config",
    "edgedistill.deps",
    "edgedistill.errors",
    "edgedistill.files",
    "edgedistill.gguf_header",
    "edgedistill.isolate",
    "edgedistill.llamacpp",
    "edgedistill.system",
    "edgedistill.token_pieces",
)


@dataclass(frozen=True)
class Import:
    """One imported module (and, for ``from M import name``, the name) at a line of a module."""

    importer: str
    line: int
    module: str  # the module the import loads: M, or M.name where that is a module of the package
    name: str | None  # the name taken from M (``from M import name``), else None
    typing_only: bool  # under ``if TYPE_CHECKING:``
    source: str = ""  # M as written (made absolute), for ``from M import name``

    def where(self, modules: dict[str, Path]) -> str:
        imported = f"from {self.source} import {self.name}" if self.name else f"import {self.module}"
        return f"{modules[self.importer].relative_to(REPO)}:{self.line}: {imported}"


def package_modules() -> dict[str, Path]:
    """Every module setuptools installs (pyproject.toml's packages and package-dir), by dotted name."""
    setup = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    modules = {}
    for package in setup["packages"]:
        directory = REPO / setup["package-dir"].get(package, package.replace(".", "/"))
        for path in sorted(directory.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def folder(module: str, modules: dict[str, Path]) -> Path:
    return modules[module].parent


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, typing_only: bool = False):
    """Every node under ``node`` with whether it sits under ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for item in child.body:
                yield item, True
                yield from _walk(item, True)
            for item in child.orelse:
                yield item, typing_only
                yield from _walk(item, typing_only)
            continue
        yield child, typing_only
        yield from _walk(child, typing_only)


def _absolute(module: str | None, level: int, importer: str, modules: dict[str, Path]) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``importer``."""
    if not level:
        return module or ""
    package = importer if modules[importer].stem == "__init__" else importer.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def imports_of(importer: str, modules: dict[str, Path]) -> tuple[list[Import], list[tuple[int, str, str]]]:
    """The imports of one module, and its attribute reads ``alias.name`` on modules of the package it imported."""
    tree = ast.parse(modules[importer].read_text(encoding="utf-8"), filename=str(modules[importer]))
    found: list[Import] = []
    aliases: dict[str, str] = {}  # local name -> module of the package it is bound to
    for node, typing_only in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(importer, node.lineno, alias.name, None, typing_only))
                if alias.name in modules:
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node.module, node.level, importer, modules)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                module = submodule if submodule in modules else source
                found.append(Import(importer, node.lineno, module, alias.name, typing_only, source))
                if submodule in modules:
                    aliases[alias.asname or alias.name] = submodule
    attributes = [
        (node.lineno, aliases[node.value.id], node.attr)
        for node, _ in _walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
    ]
    return found, attributes


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _ours(module: str) -> bool:
    return module == PACKAGE or module.startswith(f"{PACKAGE}.")


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return package_modules()


@pytest.fixture(scope="module")
def graph(modules) -> dict[str, tuple[list[Import], list[tuple[int, str, str]]]]:
    return {module: imports_of(module, modules) for module in modules}


def _report(violations: list[str], what: str) -> str:
    return f"{len(violations)} {what}:\n  " + "\n  ".join(violations)


def test_the_core_is_the_listed_modules(modules):
    in_folder = {module for module, path in modules.items() if path.parent == REPO / PACKAGE}
    found = sorted(in_folder - {f"{PACKAGE}.{command}" for command in COMMANDS})
    assert found == sorted(CORE), "edgedistill/ holds a module that is neither in CORE nor in COMMANDS (or lost one)"


def test_runtime_imports_only_the_core(modules, graph):
    runtime = f"{PACKAGE}.runtime"
    violations = [
        item.where(modules)
        for module, (found, _) in graph.items()
        if module == runtime or module.startswith(f"{runtime}.")
        for item in found
        if _ours(item.module)
        and item.module not in CORE
        and item.module != runtime
        and not item.module.startswith(f"{runtime}.")
    ]
    assert not violations, _report(violations, "imports from runtime/ of neither the core nor runtime/")


def test_the_core_imports_no_stage_and_no_command(modules, graph):
    violations = [
        item.where(modules)
        for module, (found, _) in graph.items()
        if module in CORE
        for item in found
        if _ours(item.module) and item.module not in CORE
    ]
    assert not violations, _report(violations, "imports from the core of a stage or a top-level command")


def test_no_module_imports_a_stage_folder_by_its_bare_name(modules, graph):
    bare = ("distill", "export", "runtime", "bench", "tests", "conftest")
    violations = [
        item.where(modules) for found, _ in graph.values() for item in found if item.module.split(".")[0] in bare
    ]
    assert not violations, _report(violations, "imports of a folder outside the edgedistill namespace")


def test_no_private_name_is_imported_across_folders(modules, graph):
    violations = []
    for module, (found, attributes) in graph.items():
        home = folder(module, modules)
        for item in found:
            if item.module not in modules or folder(item.module, modules) == home:
                continue
            private_module = any(_private(part) for part in item.module.split("."))
            if private_module or (item.name is not None and _private(item.name)):
                violations.append(item.where(modules))
        for line, target, attribute in attributes:
            if _private(attribute) and folder(target, modules) != home:
                violations.append(f"{modules[module].relative_to(REPO)}:{line}: {target}.{attribute}")
    assert not violations, _report(violations, "private names used across folders")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (or a module importing itself), as the
    list of modules along it, found with Tarjan's algorithm (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
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
                if len(component) > 1 or node in edges[node]:
                    components.append(component)
    return [_cycle_through(sorted(component)[0], component, edges) for component in components]


def _cycle_through(start: str, component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """The shortest path from ``start`` back to itself inside ``component`` (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is on no cycle of its component")  # pragma: no cover


def test_the_cycle_finder_reports_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(_cycles(edges)) == [["a", "b", "c", "a"], ["e", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle(modules, graph):
    edges: dict[str, set[str]] = {module: set() for module in modules}
    lines: dict[tuple[str, str], Import] = {}
    for module, (found, _) in graph.items():
        for item in found:
            if item.module in modules and not item.typing_only:
                edges[module].add(item.module)
                lines.setdefault((module, item.module), item)
    cycles = _cycles(edges)
    described = [
        " -> ".join(cycle) + "  (" + "; ".join(lines[(a, b)].where(modules) for a, b in zip(cycle, cycle[1:])) + ")"
        for cycle in cycles
    ]
    assert not cycles, _report(described, "import cycles")
