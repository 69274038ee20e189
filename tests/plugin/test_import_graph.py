"""The package's modules never import each other in a circle (issue 10).

The graph is read from the source with ``ast``, so an import inside a function (the usual
way a cycle is hidden) counts like one at the top. Left out, because they never run:
imports under ``if TYPE_CHECKING:``. Also left out: the implicit import of a parent
package (``network_requests/__init__.py`` re-exports the operator, so every module would
otherwise sit in a cycle with it); an import *of* the package itself
(``from network_requests import NetworkRequestOperator``) is an edge to ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import PLUGINS_DIR

PACKAGE = "network_requests"


def module_files(root: Path = PLUGINS_DIR / PACKAGE) -> dict[str, Path]:
    """``network_requests.x.y`` -> its file, for every module of the package."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(inner) for inner in ast.walk(child))
    return skipped


def imported_modules(module: str, path: Path, known: set[str]) -> dict[str, int]:
    """The package modules ``module`` imports (anywhere in it), each with the first line that does."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            while target and target not in known:  # ``import network_requests.x.attr``-style names
                target = target.rpartition(".")[0]
            if target and target != module:
                found.setdefault(target, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    files = module_files()
    known = set(files)
    return {module: imported_modules(module, path, known) for module, path in files.items()}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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


def describe(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    members = set(component)
    edges = [
        f"{source} -> {target} (line {line})"
        for source in component
        for target, line in sorted(graph[source].items())
        if target in members
    ]
    return "; ".join(edges)


def test_the_graph_reader_sees_imports_inside_functions_and_relative_imports(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from network_requests import b\n")
    (package / "b.py").write_text("from .sub import c\n")
    (package / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from network_requests import b\nimport network_requests.a\n"
    )
    files = module_files(package)
    graph = {module: imported_modules(module, path, set(files)) for module, path in files.items()}

    assert graph["network_requests.a"] == {"network_requests.b": 2}
    assert graph["network_requests.b"] == {"network_requests.sub.c": 1}
    assert graph["network_requests.sub.c"] == {"network_requests.a": 4}  # not b: TYPE_CHECKING only
    assert cycles(graph) == [["network_requests.a", "network_requests.b", "network_requests.sub.c"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "network_requests.operators" in graph and graph["network_requests.links"], "the graph was not read"

    found = cycles(graph)

    assert found == [], "\n".join(describe(graph, component) for component in found)


def test_the_link_knows_nothing_of_the_operator_or_the_trigger():
    imported = import_graph()["network_requests.links"]
    assert not {"network_requests.operators", "network_requests.triggers"} & set(imported)
