"""The suite's own layout: every test under tests/e2e/ is marked ``slow`` and none under tests/unit/ is,
so ``-m "not slow"`` selects exactly the unit tests; test modules live only in those two folders."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO_ROOT

TESTS = REPO_ROOT / "tests"


def slow_tests(path: Path) -> dict[str, bool]:
    """Test function -> whether it is marked slow (by a decorator or the module's ``pytestmark``)."""
    tree = ast.parse(path.read_text())
    module_slow = any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets)
                      and "slow" in ast.unparse(node.value) for node in tree.body)
    return {node.name: module_slow or any("mark.slow" in ast.unparse(d) for d in node.decorator_list)
            for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_e2e_tests_are_all_slow_and_unit_tests_none():
    for folder, slow in (("e2e", True), ("unit", False)):
        files = sorted((TESTS / folder).glob("test_*.py"))
        assert files and (TESTS / folder / "__init__.py").is_file()
        for path in files:
            marks = slow_tests(path)
            assert marks, f"{path.name} has no tests"
            wrong = sorted(name for name, marked in marks.items() if marked != slow)
            assert not wrong, f"tests/{folder}/{path.name}: {'not ' if slow else ''}marked slow: {wrong}"


def test_test_modules_live_only_in_unit_and_e2e():
    assert not sorted(p.name for p in TESTS.glob("test_*.py")), "a test module outside tests/unit/ and tests/e2e/"
