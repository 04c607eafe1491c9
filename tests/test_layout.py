"""The package layout keeps its arrows (DESIGN.md s3): an import graph read with ``ast``.

Every ``import`` and ``from ... import`` of every module under ``paramarket_jax/`` counts,
at module level and inside functions, relative imports resolved. Importing
``paramarket_jax.x.y`` also runs the package inits ``paramarket_jax.x`` and
``paramarket_jax`` (an edge to each, except to the importer's own packages, whose inits
have begun before the importer runs). Each test names the offending edges (file and line)
or the cycle it finds.
"""

from __future__ import annotations

import ast
import pathlib
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "paramarket_jax"

# Function-local imports of paramarket_jax modules allowed here, and what they defer.
DEFERRING = {
    f"{PACKAGE}.cli.main": "the command answers --help, `scenarios` and a bad scenario key "
    "without JAX, orbax, pandas or matplotlib; each command imports what computes",
    f"{PACKAGE}.scenario": "the registries (datasets, partitioners, models, optimizers, "
    "mechanisms) import their kernels and so JAX; only a valid scenario's names need them",
    f"{PACKAGE}.runs": "Mesa (only the Mesa engine needs it; the batch path never imports "
    "it) and matplotlib (only a run that writes its report draws)",
    f"{PACKAGE}.viz.server": "paramarket viz checks its source, knobs and port (one line, "
    "exit 2) before it imports JAX, pandas or the viz extra",
}
MARKET_MUST_NOT_IMPORT = ("engines", "results", "scenario", "experiment", "runs", "sweep", "cli")
RESULTS_MUST_NOT_IMPORT = ("engines", "market")
SCENARIO_MUST_NOT_IMPORT = ("jax", "flax", "optax")
MOST_TOP_LEVEL_MODULES = 6


class Import(NamedTuple):
    """One import statement's target, as seen from the module that runs it."""

    source: str  # importing module, e.g. paramarket_jax.market.round
    target: str  # imported module or package (internal), or a top-level name (external)
    line: int
    local: bool  # inside a function: runs when the function is called
    deferred: bool  # carries a ``deferred:`` comment (same line, or above its import block)

    def __str__(self) -> str:
        where = "function-local" if self.local else "module-level"
        return f"{self.source} -> {self.target} ({path_of(self.source)}:{self.line}, {where})"


def module_files() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    files = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


MODULES = module_files()


def path_of(module: str) -> str:
    return str(MODULES[module].relative_to(ROOT))


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def ancestors(module: str) -> list[str]:
    """The packages whose inits run before ``module``: a.b.c -> [a, a.b]."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def internal(name: str) -> str | None:
    """The longest prefix of a dotted name that is one of the package's modules."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def _deferred_lines(source: str, tree: ast.Module) -> set[int]:
    """Lines of import statements with a ``deferred:`` comment on the same line (or any line
    of a statement over several lines) or on the line above its block of imports."""
    lines = source.splitlines()

    def says(lineno: int) -> bool:
        return 1 <= lineno <= len(lines) and "deferred:" in lines[lineno - 1]

    marked: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        block_marked = False
        previous_import = False
        for stmt in body:
            if not isinstance(stmt, ast.Import | ast.ImportFrom):
                previous_import = False
                continue
            if not previous_import:
                block_marked = says(stmt.lineno - 1)
            previous_import = True
            own = any(says(n) for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
            if own or block_marked:
                marked.add(stmt.lineno)
    return marked


def imports_of(module: str) -> list[Import]:
    """Every import statement of one module, resolved to internal modules or external
    top-level names, with the package inits it also runs."""
    path = MODULES[module]
    source = path.read_text()
    tree = ast.parse(source, str(path))
    deferred = _deferred_lines(source, tree)
    own_packages = set(ancestors(module)) | {module}
    here = module if is_package(module) else module.rsplit(".", 1)[0]
    found: list[Import] = []

    def add(name: str, node: ast.stmt, local: bool) -> None:
        target = internal(name) if name.split(".")[0] == PACKAGE else name.split(".")[0]
        if target is None:
            return
        deferral = node.lineno in deferred
        runs = [target] if target not in MODULES else [*ancestors(target), target]
        for t in runs:
            if t not in own_packages:
                found.append(Import(module, t, node.lineno, local, deferral))

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, local)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = here.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    name = ".".join([*base, child.module] if child.module else base)
                else:
                    name = child.module or ""
                add(name, child, local)
                if name.split(".")[0] == PACKAGE:
                    for alias in child.names:  # ``from pkg import submodule``
                        if f"{name}.{alias.name}" in MODULES:
                            add(f"{name}.{alias.name}", child, local)
            visit(child, inner)

    visit(tree, False)
    return found


EDGES = [edge for module in MODULES for edge in imports_of(module)]


def in_floor(module: str, floor: str) -> bool:
    name = f"{PACKAGE}.{floor}"
    return module == name or module.startswith(name + ".")


def report(title: str, lines: list[str]) -> str:
    return f"{title} ({len(lines)}):\n  " + "\n  ".join(lines)


def cycles(edges: list[Import]) -> list[list[Import]]:
    """One cycle through each strongly connected group of internal modules (Tarjan)."""
    graph: dict[str, list[Import]] = {m: [] for m in MODULES}
    for e in edges:
        if e.target in MODULES:
            graph[e.source].append(e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:  # recursion depth: at most the number of modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph[v]:
            if e.target not in index:
                connect(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or any(e.target == v for e in graph[v]):
                groups.append(group)

    for v in graph:
        if v not in index:
            connect(v)
    found = []
    for group in groups:
        start = min(group)
        # the shortest path from start back to start inside the group (breadth first)
        paths: dict[str, list[Import]] = {start: []}
        queue = [start]
        while queue:
            v = queue.pop(0)
            for e in graph[v]:
                if e.target not in group:
                    continue
                if e.target == start:
                    found.append([*paths[v], e])
                    queue = []
                    break
                if e.target not in paths:
                    paths[e.target] = [*paths[v], e]
                    queue.append(e.target)
    return found


def test_the_graph_is_read():
    """The reader sees the arrows it is meant to check (the tests below are not vacuous)."""
    assert f"{PACKAGE}.market.round" in MODULES and f"{PACKAGE}.cli.main" in MODULES
    targets = {(e.source, e.target) for e in EDGES}
    assert (f"{PACKAGE}.market.round", f"{PACKAGE}.market.types") in targets
    assert (f"{PACKAGE}.market.round", "jax") in targets
    assert (f"{PACKAGE}.market.trade", f"{PACKAGE}.economics") in targets  # a package init
    assert (f"{PACKAGE}.market.round", f"{PACKAGE}.market") not in targets  # its own package
    assert any(e.local and e.source == f"{PACKAGE}.scenario" for e in EDGES)


def test_no_import_cycle():
    """Counting function-local imports: a cycle hidden inside a function is still one."""
    found = cycles(EDGES)
    lines = [
        " -> ".join([c[0].source, *(e.target for e in c)])
        + "\n      "
        + "\n      ".join(map(str, c))
        for c in found
    ]
    assert not found, report("import cycles", lines)


def test_the_market_imports_no_floor_above_it_nor_mesa():
    """``market/`` is the pure market: kernels only, no engines, files, scenario or Mesa."""
    banned = [f"{PACKAGE}.{f}" for f in MARKET_MUST_NOT_IMPORT]
    bad = [
        str(e)
        for e in EDGES
        if in_floor(e.source, "market")
        and (
            e.target == "mesa" or any(e.target == b or e.target.startswith(b + ".") for b in banned)
        )
    ]
    assert not bad, report("market/ imports a floor above it (or mesa)", bad)


def test_results_import_no_engine_nor_the_market():
    """``results/`` turns tables into files: it never imports an engine or the market."""
    bad = [
        str(e)
        for e in EDGES
        if in_floor(e.source, "results")
        and any(in_floor(e.target, f) for f in RESULTS_MUST_NOT_IMPORT)
    ]
    assert not bad, report("results/ imports an engine or the market", bad)


def test_the_scenario_layer_imports_no_jax_at_module_level():
    """Following module-level imports from ``scenario`` (package inits included), no JAX,
    Flax or Optax is reached: the chain to each one found is shown."""
    start = f"{PACKAGE}.scenario"
    chains: dict[str, list[Import]] = {start: []}
    queue = [start]
    bad = []
    while queue:
        v = queue.pop(0)
        for e in EDGES:
            if e.source != v or e.local:
                continue
            if e.target in SCENARIO_MUST_NOT_IMPORT:
                bad.append("\n      ".join(map(str, [*chains[v], e])))
            elif e.target in MODULES and e.target not in chains:
                chains[e.target] = [*chains[v], e]
                queue.append(e.target)
    assert not bad, report("scenario reaches JAX at import time", bad)


def test_few_modules_at_the_top_of_the_package():
    top = sorted(p.name for p in (ROOT / PACKAGE).glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MOST_TOP_LEVEL_MODULES, (
        f"{len(top)} modules directly in {PACKAGE}/ (at most {MOST_TOP_LEVEL_MODULES}): "
        f"{', '.join(top)}; a new idea gets a module in the floor it belongs to"
    )


def test_function_local_imports_only_defer_a_heavy_dependency():
    """A function-local import of a package module hides an arrow; it is allowed only
    where it defers JAX, orbax or matplotlib (``DEFERRING``), saying so in a
    ``deferred:`` comment."""
    local = [e for e in EDGES if e.local and e.target in MODULES]
    where = sorted({f"{e.source}:{e.line}": e for e in local}.values(), key=str)
    outside = [str(e) for e in where if e.source not in DEFERRING]
    silent = [str(e) for e in where if e.source in DEFERRING and not e.deferred]
    problems = []
    if outside:
        title = f"function-local imports outside the allow-list ({', '.join(DEFERRING)})"
        problems.append(report(title, outside))
    if silent:
        problems.append(report("function-local imports without a 'deferred:' comment", silent))
    assert not problems, "\n".join(problems)
