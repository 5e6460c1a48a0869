"""The package's structure: no import cycles, and no trajectory-matching method chosen by name
outside the registry (STYLE.md: "a variant wraps the core; the core knows no variant")."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ddjax"


def _modules() -> dict[str, Path]:
    modules = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = file
    return modules


def _imports(file: Path, modules: dict[str, Path]) -> set[str]:
    """The ddjax modules a file imports anywhere (module level or inside functions).

    ``from pkg import sub`` imports the submodule ``pkg.sub`` when it is one; ``from mod import
    name`` imports ``mod``; a name is resolved to its longest known module prefix.
    """

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in modules
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found |= {known(n) for n in names if n.startswith("ddjax")} - {None}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return components


def test_no_import_cycle_in_ddjax():
    modules = _modules()
    graph = {name: _imports(file, modules) - {name} for name, file in modules.items()}
    assert "ddjax.distill.core" in graph["ddjax.distill.run"]  # the graph sees real imports
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", ["core.py", "run.py", "method.py", "matching.py"])
def test_the_core_and_the_driver_never_branch_on_a_method_name(module):
    source = (PACKAGE / "distill" / module).read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names = {ast.unparse(side) for side in sides}
            assert not any(name.endswith("method") for name in names), ast.unparse(node)
