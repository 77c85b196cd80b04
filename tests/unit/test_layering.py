"""The package's shape: each floor imports only the floors below it (core <- experiment <- report <- cli),
and no module imports, at any depth or inside a function, one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "ldmole"
FLOORS = {"core": 0, "experiment": 1, "report": 2, "cli": 3}


def module_names() -> dict[str, Path]:
    """``ldmole.x.y`` -> its file, packages by their ``__init__.py``."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _runtime_imports(tree: ast.AST):
    """Import statements that run (anywhere, functions included), skipping ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _runtime_imports(ast.Module([child], [])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _runtime_imports(node)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (a name imported from a package counts as its submodule
    when one has that name, else as the package)."""
    names = module_names()
    graph: dict[str, set[str]] = {name: set() for name in names}
    for name, path in names.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
            else:
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in names and t != name}
    return graph


def floor(name: str) -> int:
    parts = name.split(".")
    return FLOORS.get(parts[1], -1) if len(parts) > 1 else -1


def test_no_floor_imports_a_floor_above_it():
    upward = sorted((a, b) for a, targets in import_graph().items() for b in targets
                    if floor(a) >= 0 and floor(b) > floor(a))
    assert not upward, upward


def test_no_import_circle():
    graph = import_graph()
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)
