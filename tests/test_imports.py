"""The import graph of src/alambic: no cycle between modules, none between the parts of alambic, and no private
name borrowed across packages.

The graph is read from the source statically (ast over every module), so a function-level import counts as much
as a module-level one: an import inside a function still ties the two modules together, and a cycle through it is
only hidden until the function runs. Relative imports are resolved, and `from pkg import name` where name is a
submodule is an edge to that submodule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import alambic

ROOT = Path(alambic.__file__).parent


def _modules() -> dict[str, Path]:
    """Every module of alambic by dotted name (a package by its __init__.py)."""
    found: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("alambic", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _package_of(module: str) -> str:
    """The package a module belongs to (a package's __init__ belongs to the package itself)."""
    return module if _is_package(module) else module.rpartition(".")[0]


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an `from ... import` names, relative levels resolved."""
    if node.level == 0:
        return node.module or ""
    base = _package_of(module).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(name: str) -> str | None:
    """The alambic module that `name` is, or the nearest one above it."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, name taken from it or None, line) for every import in the module, at any depth."""
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(ast.parse(MODULES[module].read_text(), str(MODULES[module]))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (owner := _owner(alias.name)) is not None:
                    found.append((owner, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            if (owner := _owner(source)) is None:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in MODULES:  # `from pkg import submodule`: an edge to the submodule itself
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((owner, alias.name, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {module: set() for module in MODULES}
    for module in MODULES:
        for target, _, _ in _imports(module):
            if target != module:
                edges[module].add(target)
    # Importing a.b.c first runs a/__init__ and a/b/__init__: a package's __init__ that imports its own
    # submodules is the ordinary layout, not a cycle, so the parent-package edge is not added.
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The shortest cycle through each module that is on one (strongly connected components, Tarjan), as paths
    a -> ... -> a, each cycle once."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)

    cycles: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for component in components:
        members = set(component)
        for start in sorted(component):
            # Breadth-first from start back to start inside the component: the shortest cycle through it.
            paths = {start: [start]}
            queue = [start]
            cycle: list[str] | None = None
            while queue and cycle is None:
                node = queue.pop(0)
                for nxt in sorted(edges[node] & members):
                    if nxt == start:
                        cycle = [*paths[node], start]
                        break
                    if nxt not in paths:
                        paths[nxt] = [*paths[node], nxt]
                        queue.append(nxt)
            if cycle is None:
                continue
            # One entry per cycle, whichever member it was found from: rotate it to start at its smallest member.
            ring = cycle[:-1]
            first = ring.index(min(ring))
            key = tuple(ring[first:] + ring[:first])
            if key not in seen:
                seen.add(key)
                cycles.append([*key, key[0]])
    return cycles


def test_the_graph_sees_function_level_and_relative_imports():
    # The checks below are only as good as the graph: pin that it finds what it must.
    edges = _graph()
    assert "alambic.losses.divergences" in edges["alambic.losses.chunked"]
    assert len(MODULES) > 50 and all(module.startswith("alambic") for module in MODULES)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    """No two modules of alambic import each other, directly or through others (function-level imports count)."""
    cycles = _cycles(_graph())
    assert not cycles, "import cycles in src/alambic:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _part(module: str) -> str:
    """The part of alambic a module is in: its top-level subpackage (alambic.data), or itself (alambic.modeling)."""
    return ".".join(module.split(".")[:2])


def test_no_cycle_between_packages():
    """Dependencies between the parts of alambic point one way (docs/architecture.md: cli -> stages -> (students,
    data, training, evaluation, report) -> losses, models, config): no part imports another that imports it back,
    even through different modules (data.select -> report.plots while report.render -> data.select is no module
    cycle, but ties data and report together)."""
    parts: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        if module == "alambic":
            continue
        parts.setdefault(_part(module), set()).update(
            _part(t) for t in targets if t != "alambic" and _part(t) != _part(module)
        )
    for targets in list(parts.values()):
        for target in targets:
            parts.setdefault(target, set())
    cycles = _cycles(parts)
    links = {
        (a, b): sorted(
            f"{m} -> {t}"
            for m, ts in _graph().items()
            for t in ts
            if m != "alambic" and t != "alambic" and (_part(m), _part(t)) == (a, b)
        )
        for cycle in cycles
        for a, b in zip(cycle, cycle[1:])
    }
    assert not cycles, "import cycles between the parts of src/alambic:\n" + "\n".join(
        " -> ".join(cycle)
        + "\n"
        + "\n".join(f"    {a} -> {b}: {', '.join(links[(a, b)])}" for a, b in zip(cycle, cycle[1:]))
        for cycle in cycles
    )


def test_no_private_name_imported_across_packages():
    """A name with a leading underscore is imported only inside its own package.

    The rule: a private name (`_x`) may be imported by a module of the same package as the module that
    defines it (alambic.config._base by alambic.config.run); a module of another package, parent and child
    packages included, imports only public names. When another package needs a name, it is made public in
    the module that owns it (style.md, "Public seams"). Modules whose own name is private (config/_base.py)
    follow the same rule: they are imported only from inside their package.
    """
    found = []
    for module in MODULES:
        for target, name, line in _imports(module):
            if _package_of(target) == _package_of(module):
                continue
            private_module = any(part.startswith("_") and part != "__init__" for part in target.split("."))
            if (name is not None and name.startswith("_")) or private_module:
                found.append(
                    f"{MODULES[module].relative_to(ROOT.parent)}:{line} imports {name or target} from {target}"
                )
    assert not found, "private names imported across packages:\n" + "\n".join(found)
