"""Find state writes outside ``db/`` by reading the source (AST), not by running it.

What counts as a write:
- a SQLAlchemy ``insert``/``update``/``delete`` statement (or ``text("UPDATE …")``);
- ``session.add``/``add_all``/``merge``/``delete``/``bulk_*`` on something that is a session;
- an assignment to a mapped attribute of a mapped row (``job.status = …``, ``version.artifact_uri = …``).

A plain grep would also match ``progress.update(`` and ``@router.delete(``, so rows are recognised by what a
function knows of its names: a parameter annotated with a mapped class, a name bound to ``Job(...)``, to an
expression that mentions a mapped class (``session.get(Job, …)``, ``select(Job)…``), or to a call of a function
whose return annotation names one (``register_version(...) -> ModelVersion``).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SESSION_METHODS = {
    "add",
    "add_all",
    "merge",
    "delete",
    "bulk_save_objects",
    "bulk_insert_mappings",
    "bulk_update_mappings",
}
SQL_VERBS = {"insert", "update", "delete"}
QUERY_METHODS = {
    "get",
    "get_one",
    "scalar",
    "scalars",
    "execute",
    "one",
    "first",
    "one_or_none",
    "all",
    "merge",
    "unique",
}


@dataclass(frozen=True)
class Write:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def mentions(text: str, names: Iterable[str]) -> bool:
    return any(re.search(rf"\b{re.escape(name)}\b", text) for name in names)


def functions_returning_rows(trees: Iterable[ast.Module], mapped: set[str]) -> set[str]:
    """Names of functions (anywhere in the tree) whose return annotation names a mapped class."""
    found = set()
    for tree in trees:
        for node in ast.walk(tree):
            returns = getattr(node, "returns", None)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and returns is not None:
                found |= {node.name} if mentions(ast.unparse(returns), mapped) else set()
    return found


class _Scope(ast.NodeVisitor):
    """Walks one function (or a module's top level), learning which names hold rows, and reports writes."""

    def __init__(self, path: str, mapped: set[str], attrs: set[str], row_functions: set[str], sql_names: set[str]):
        self.path, self.mapped, self.attrs = path, mapped, attrs
        self.row_functions, self.sql_names = row_functions, sql_names
        self.rows: set[str] = set()
        self.sessions: set[str] = set()
        self.writes: list[Write] = []

    # --- what a name holds
    def _is_row_expression(self, value: ast.expr) -> bool:
        if isinstance(value, ast.Name):
            return value.id in self.rows
        if isinstance(value, ast.Attribute):  # `shard.job`: a relationship of a row
            return self._root(value) in self.rows
        if isinstance(value, ast.Subscript):
            return self._is_row_expression(value.value)
        if isinstance(value, ast.IfExp):
            return self._is_row_expression(value.body) or self._is_row_expression(value.orelse)
        if isinstance(value, ast.BoolOp):
            return any(self._is_row_expression(v) for v in value.values)
        if isinstance(value, ast.List | ast.Tuple | ast.Set):
            return any(self._is_row_expression(v) for v in value.elts)
        if isinstance(value, ast.ListComp | ast.GeneratorExp | ast.SetComp):
            return self._is_row_expression(value.elt)
        if isinstance(value, ast.Call):
            func = value.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in self.mapped or name in self.row_functions:
                return True
            if isinstance(func, ast.Attribute) and name in QUERY_METHODS:
                # session.get(Job, …), session.scalars(select(Job)).all(): a query whose text names a mapped class
                return mentions(ast.unparse(value), self.mapped) or self._is_row_expression(func.value)
        return False

    def _bind(self, target: ast.expr, is_row: bool) -> None:
        if isinstance(target, ast.Name) and is_row:
            self.rows.add(target.id)
        elif isinstance(target, ast.Tuple | ast.List):
            for element in target.elts:
                self._bind(element, is_row)

    def _root(self, node: ast.expr) -> str | None:
        while isinstance(node, ast.Attribute | ast.Subscript):
            node = node.value
        return node.id if isinstance(node, ast.Name) else None

    def _check_target(self, target: ast.expr, line: int) -> None:
        if isinstance(target, ast.Tuple | ast.List):
            for element in target.elts:
                self._check_target(element, line)
        elif isinstance(target, ast.Attribute) and target.attr in self.attrs and self._root(target.value) in self.rows:
            self.writes.append(Write(self.path, line, f"assigns {ast.unparse(target)}"))

    # --- visitors
    def visit_arguments(self, node: ast.arguments) -> None:
        for arg in [*node.posonlyargs, *node.args, *node.kwonlyargs]:
            if arg.annotation is None:
                continue
            annotation = ast.unparse(arg.annotation)
            if mentions(annotation, self.mapped):
                self.rows.add(arg.arg)
            if mentions(annotation, {"Session"}):
                self.sessions.add(arg.arg)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        for target in node.targets:
            self._check_target(target, node.lineno)
        is_row = self._is_row_expression(node.value)
        for target in node.targets:
            self._bind(target, is_row)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.generic_visit(node)
        self._check_target(node.target, node.lineno)
        is_row = mentions(ast.unparse(node.annotation), self.mapped) or (
            node.value is not None and self._is_row_expression(node.value)
        )
        self._bind(node.target, is_row)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.generic_visit(node)
        self._check_target(node.target, node.lineno)

    def visit_For(self, node: ast.For) -> None:
        self._bind(node.target, self._is_row_expression(node.iter))
        self.generic_visit(node)

    def visit_withitem(self, node: ast.withitem) -> None:
        self.generic_visit(node)
        if node.optional_vars is not None and "session" in ast.unparse(node.optional_vars).lower():
            self._bind(node.optional_vars, False)

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Name) and func.id in self.sql_names:
            self.writes.append(Write(self.path, node.lineno, f"SQL {func.id}(…)"))
        elif isinstance(func, ast.Attribute):
            receiver = ast.unparse(func.value)
            if func.attr in SQL_VERBS and (receiver == "sqlalchemy" or "__table__" in receiver):
                self.writes.append(Write(self.path, node.lineno, f"SQL {receiver}.{func.attr}(…)"))
            if func.attr in SESSION_METHODS and ("session" in receiver.lower() or receiver in self.sessions):
                self.writes.append(Write(self.path, node.lineno, f"{receiver}.{func.attr}(…)"))
            if func.attr == "text" and receiver == "sqlalchemy":
                self._check_raw_sql(node)
        if isinstance(func, ast.Name) and func.id == "text":
            self._check_raw_sql(node)
        if isinstance(func, ast.Name) and func.id == "setattr" and node.args and self._root(node.args[0]) in self.rows:
            self.writes.append(Write(self.path, node.lineno, f"setattr on {ast.unparse(node.args[0])}"))

    def _check_raw_sql(self, node: ast.Call) -> None:
        first = node.args[0] if node.args else None
        sql = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else ""
        if re.match(r"\s*(insert|update|delete|truncate)\b", sql, re.I):
            self.writes.append(Write(self.path, node.lineno, "raw SQL write"))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        # A nested function sees the names of the one around it (closures), and learns its own.
        inner = _Scope(self.path, self.mapped, self.attrs, self.row_functions, self.sql_names)
        inner.rows, inner.sessions = set(self.rows), set(self.sessions)
        inner.visit(node.args)
        for statement in node.body:
            inner.visit(statement)
        self.writes.extend(inner.writes)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]


def sqlalchemy_verbs(tree: ast.Module) -> set[str]:
    """Local names of ``insert``/``update``/``delete`` imported from any sqlalchemy module."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
            names |= {alias.asname or alias.name for alias in node.names if alias.name in SQL_VERBS}
    return names


def find_writes(
    sources: dict[str, str], *, mapped: set[str], attrs: set[str], row_functions: set[str] = frozenset()
) -> Iterator[Write]:
    """Every state write in ``sources`` (path → source text)."""
    trees = {path: ast.parse(text) for path, text in sources.items()}
    known = set(row_functions) | functions_returning_rows(trees.values(), mapped)
    for path, tree in trees.items():
        scope = _Scope(path, mapped, attrs, known, sqlalchemy_verbs(tree))
        scope.visit(tree)
        yield from scope.writes


def python_files(root: Path, folders: Iterable[str]) -> dict[str, str]:
    files = {}
    for folder in folders:
        base = root / folder
        paths = [base] if base.suffix == ".py" else sorted(base.rglob("*.py"))
        files.update({str(path.relative_to(root)): path.read_text() for path in paths})
    return files
