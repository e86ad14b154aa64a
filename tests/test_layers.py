"""The package's layers point one way (no import cycle inside bsafuse, the named layers hold), and
its modules stay small.

Every import counts, at module level or inside a function (a lazy import that points back up a
layer is still a cycle a maintainer has to reason about); only `if TYPE_CHECKING:` blocks are left
out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bsafuse"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements outside `if TYPE_CHECKING:` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """bsafuse module -> the bsafuse modules it imports (`from bsafuse import x` names module x)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := walk(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)) is not None:
            return cycle
    return None


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_relative_and_package_imports_are_resolved() -> None:
    graph = import_graph()
    assert "bsafuse.io.image" in graph["bsafuse.io.png"]  # `from bsafuse.io.image import ...`
    assert "bsafuse.weights" in graph["bsafuse.loading"]  # `from bsafuse import weights as ...`


def test_no_import_cycle_inside_bsafuse() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("module", "must_not_reach"),
    [
        ("bsafuse.results", {"bsafuse.api", "bsafuse.batch", "bsafuse.model", "bsafuse.cli"}),  # a leaf
        ("bsafuse.api", {"bsafuse.batch", "bsafuse.cli", "bsafuse.report"}),  # arrays, no files
        ("bsafuse.batch", {"bsafuse.cli"}),
        ("bsafuse.model.bsafusion", {"bsafuse.weights", "bsafuse.api", "bsafuse.io"}),  # reads no files
        ("bsafuse.training.validation", {"bsafuse.training.trainer"}),
    ],
)
def test_layers_point_one_way(module: str, must_not_reach: set[str]) -> None:
    graph = import_graph()
    if module not in graph:
        pytest.fail(f"{module} does not exist")
    assert not (reaches(graph, module) & must_not_reach)


def test_no_module_is_over_350_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 350
    }
    assert not long, f"split these modules by concept: {long}"
