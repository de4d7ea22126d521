"""The test suite's own layout: test modules import helpers only from helper modules (tests/stack.py,
tests/factories.py, …), never from another test module or a conftest; one Stack helper; one map of Redis DBs,
each DB for one purpose; fixtures named for what they give."""

from __future__ import annotations

import ast
import re

from tests.stack import REPO, RedisDb

TESTS = REPO / "tests"
# Renamed for what they give (empty_db, db_with_builtins, session_factory): the old names must not come back.
VAGUE_FIXTURE_NAMES = {"db", "registry", "sessions"}


def modules() -> dict[str, ast.Module]:
    return {str(path.relative_to(REPO)): ast.parse(path.read_text()) for path in sorted(TESTS.rglob("*.py"))}


def is_test_module(name: str) -> bool:
    return name.startswith(("test_", "conftest"))


def imported_modules(tree: ast.Module) -> list[str]:
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


def test_no_test_module_imports_from_a_test_module_or_a_conftest() -> None:
    assert "tests/conftest.py" in modules() and len(modules()) > 40  # the walk finds the suite
    offenders = [
        (path, module)
        for path, tree in modules().items()
        for module in imported_modules(tree)
        if module.startswith("tests.") and is_test_module(module.rsplit(".", 1)[-1])
    ]
    assert offenders == []


def test_there_is_one_stack_class() -> None:
    stacks = [
        (path, node.name)
        for path, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.name.endswith("Stack")
    ]
    assert stacks == [("tests/stack.py", "Stack")]


def test_each_redis_db_has_one_purpose_and_every_test_takes_its_db_from_the_map() -> None:
    # An IntEnum member with another's value would be an alias: two names, one DB.
    assert len(RedisDb.__members__) == len(set(RedisDb))
    assert all(1 <= db <= 15 for db in RedisDb)  # DB 0 is left to a developer's own `lmbatch up`
    hard_coded = re.compile(r"redis://[^/\s]*:6379/\d")
    for path, tree in modules().items():
        for node in ast.walk(tree):
            if path != "tests/stack.py" and isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not hard_coded.search(node.value), (path, node.lineno, node.value)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "on_private_redis_db":
                database = node.args[1]
                named = isinstance(database, ast.Attribute) and getattr(database.value, "id", None) == "RedisDb"
                assert named, (path, node.lineno, ast.unparse(database))


def test_no_fixture_has_a_vague_name() -> None:
    for path, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in VAGUE_FIXTURE_NAMES:
                decorators = [ast.unparse(d) for d in node.decorator_list]
                assert not any("fixture" in d for d in decorators), (path, node.name)
