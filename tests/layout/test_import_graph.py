"""No import cycle among the modules of api/, db/ and workers/ (imports inside functions count too; imports under
``if TYPE_CHECKING:`` do not, since they never run). The layers themselves are import-linter contracts in
pyproject.toml, checked by ``make lint``."""

from __future__ import annotations

import grimp

PACKAGES = ("api", "db", "workers")


def import_cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each a cycle or several knotted together."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module) & modules:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return groups


def project_graph() -> tuple[grimp.ImportGraph, set[str]]:
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True, cache_dir=None)
    return graph, {module for module in graph.modules if module.split(".")[0] in PACKAGES}


def test_the_cycle_finder_sees_a_cycle() -> None:
    # Given a graph with a -> b -> c -> a and d -> a, I expect exactly the one cycle.
    graph = grimp.ImportGraph()
    for importer, imported in [("x.a", "x.b"), ("x.b", "x.c"), ("x.c", "x.a"), ("x.d", "x.a")]:
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph, {"x.a", "x.b", "x.c", "x.d"}) == [["x.a", "x.b", "x.c"]]


def test_no_import_cycle_among_api_db_and_workers() -> None:
    graph, modules = project_graph()
    assert len(modules) > 50  # the whole project was read, not an empty graph
    assert import_cycles(graph, modules) == []
