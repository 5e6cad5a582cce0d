"""The layers point one way (docs/design.md, "Layers").

The import graph of the failover package, the top-level migration package and demo_services
is built from the source with `ast`: every import that runs counts, at module level or inside
a function. Imports under `if TYPE_CHECKING:` (annotations only) are excluded explicitly from
that graph and checked in a second one that includes them. The tests fail on

* any cycle among those modules (the cycle is reported), and, separately, any cycle closed
  through `if TYPE_CHECKING:` imports (except the known ones, listed with their owner),
* failover/core importing anything that does I/O (grpc, asyncio, sockets, files, clocks,
  threads, processes, SQLite, etcd) or any failover module outside the core except the pure
  ones named in PURE_OUTSIDE_CORE,
* the daemons (failover/agent, failover/coordinator) importing the command line (failover.cli),
* a layer importing one it must sit below (FORBIDDEN_EDGES: the wire helpers import no daemon,
  the coordinator's servicer no daemon code, storage nothing above it, the daemons not each
  other),
* the live-migration engine (migration/) importing the agent, the coordinator or the command
  line, even for annotations, or its planner importing anything that does I/O.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("failover", "migration", "demo_services")

# Modules a core module must not import (the module itself or anything under it).
CORE_FORBIDDEN = (
    "grpc",
    "asyncio",
    "socket",
    "selectors",
    "subprocess",
    "sqlite3",
    "threading",
    "multiprocessing",
    "concurrent",
    "time",
    "os",
    "io",
    "shutil",
    "tempfile",
    "pathlib",
    "mmap",
    "signal",
    "aetcd",
    "failover.v1",
)

# failover modules outside failover/core that the core may use: each is pure (checked below).
PURE_OUTSIDE_CORE = (
    "failover",  # the package's __init__: a docstring and the version
    "failover.defaults",
    "failover.errors",
    "failover.service",
    "failover.paged_state",
)


# Cycles known and owned elsewhere; each entry is one strongly connected component. None now:
# `open_store` left store.py for store_url.py, which breaks the store <-> sqlite/etcd cycle.
KNOWN_CYCLES: tuple[frozenset[str], ...] = ()
# Cycles closed only by annotations (`if TYPE_CHECKING:`), known and owned elsewhere.
KNOWN_ANNOTATION_CYCLES = KNOWN_CYCLES


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "v1" in path.relative_to(ROOT).parts:  # generated gRPC stubs
                continue
            found[_module_name(path)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node of the tree except those under `if TYPE_CHECKING:` (its `else:` counts).

    Imports made only for annotations never run, so they are left out explicitly: they do not
    order module loading. Every other import counts, at module level or inside a function.
    """
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _imports(name: str, path: Path, annotations: bool = False) -> set[str]:
    """Every module `name` imports, as absolute dotted names (with `annotations`, those under
    `if TYPE_CHECKING:` too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree) if annotations else _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            # `from pkg import mod` imports the submodule pkg.mod when there is one.
            for alias in node.names:
                sub = ROOT.joinpath(*f"{module}.{alias.name}".split("."))
                if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():
                    out.add(f"{module}.{alias.name}")
    return out


def _graph(annotations: bool = False) -> dict[str, set[str]]:
    sources = _sources()
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        edges = set()
        for imported in _imports(name, path, annotations):
            if imported in sources and imported != name:
                edges.add(imported)
        graph[name] = edges
    return graph


def _all_imports() -> dict[str, set[str]]:
    return {name: _imports(name, path) for name, path in _sources().items()}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _core_may_use(module: str) -> bool:
    return module in PURE_OUTSIDE_CORE or _within(module, ("failover.core",))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle through the component's first module, for the report."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for succ in sorted(graph[node] & members):
            if succ == start:
                return paths[node] + [start]
            if succ not in paths:
                paths[succ] = paths[node] + [succ]
                queue.append(succ)
    return component


def test_the_scan_finds_the_packages():
    graph = _graph()
    assert "failover.core.replication" in graph
    assert "failover.agent.host" in graph
    assert "demo_services.kv" in graph
    assert "failover.core.sessions" in graph["failover.core.state_machine"]


def _cycle_reports(graph: dict[str, set[str]], known: tuple[frozenset[str], ...]) -> list[str]:
    return [
        " -> ".join(_a_cycle(graph, c)) + f"  (component: {', '.join(c)})"
        for c in _cycles(graph)
        if frozenset(c) not in known
    ]


def test_no_import_cycles():
    reports = _cycle_reports(_graph(), KNOWN_CYCLES)
    assert not reports, "import cycles:\n" + "\n".join(reports)


def test_no_import_cycles_through_annotations():
    """Type-only imports order no loading, but a cycle through them is still two modules that
    know each other: the direction holds for them too (Protocols name what a layer needs)."""
    reports = _cycle_reports(_graph(annotations=True), KNOWN_ANNOTATION_CYCLES)
    assert not reports, "import cycles through annotations:\n" + "\n".join(reports)


def test_known_cycles_are_still_there():
    """An entry of the known lists that no longer names a cycle is dropped, not kept."""
    runtime = {frozenset(c) for c in _cycles(_graph())}
    annotated = {frozenset(c) for c in _cycles(_graph(annotations=True))}
    stale = [sorted(c) for c in KNOWN_CYCLES if c not in runtime]
    stale += [sorted(c) for c in KNOWN_ANNOTATION_CYCLES if c not in annotated]
    assert not stale, f"known cycles that are gone or have grown (update the lists): {stale}"


def test_core_does_no_io_and_imports_only_the_core():
    bad = []
    for name, imported in _all_imports().items():
        if not _within(name, ("failover.core",)):
            continue
        for module in sorted(imported):
            if _within(module, CORE_FORBIDDEN):
                bad.append(f"{name} imports {module}")
            elif _within(module, ("failover",)) and not _core_may_use(module):
                bad.append(f"{name} imports {module} (outside the core)")
    assert not bad, "\n".join(bad)


def _impure_imports(pure: tuple[str, ...]) -> list[str]:
    """The imports of the `pure` modules that do I/O or reach past the core and `pure`."""
    return [
        f"{name} imports {module}"
        for name, imported in _all_imports().items()
        if name in pure
        for module in sorted(imported)
        if _within(module, CORE_FORBIDDEN)
        or (_within(module, ("failover", "migration"))
            and not (_core_may_use(module) or module in pure))
    ]


def test_the_pure_modules_the_core_uses_are_pure():
    bad = _impure_imports(PURE_OUTSIDE_CORE)
    assert not bad, "\n".join(bad)


def test_daemons_do_not_import_the_command_line():
    bad = [
        f"{name} imports {module}"
        for name, imported in _all_imports().items()
        if _within(name, ("failover.agent", "failover.coordinator"))
        for module in sorted(imported)
        if _within(module, ("failover.cli",))
    ]
    assert not bad, "\n".join(bad)


# Runtime imports a layer must not make: (modules, the modules they must not import).
FORBIDDEN_EDGES = (
    # The wire helpers sit below every daemon and the client.
    (("failover.net.address", "failover.net.channels", "failover.net.convert"),
     ("failover.agent", "failover.coordinator", "migration", "failover.cli",
      "failover.client", "failover.net.agent_servicers", "failover.net.coordinator_servicer")),
    # The coordinator's servicer adapts the Coordinator it is handed: it imports no daemon.
    (("failover.net.coordinator_servicer",), ("failover.agent", "failover.coordinator")),
    # Storage knows nothing of the network, the daemons or the command line.
    (("failover.storage",),
     ("failover.net", "failover.agent", "failover.coordinator", "migration",
      "failover.cli", "failover.client")),
    # The two daemons do not import each other.
    (("failover.agent",), ("failover.coordinator",)),
    (("failover.coordinator",), ("failover.agent", "migration")),
)


def test_layers_point_one_way():
    bad = [
        f"{name} imports {module}"
        for name, imported in _all_imports().items()
        for sources, targets in FORBIDDEN_EDGES
        if _within(name, sources)
        for module in sorted(imported)
        if _within(module, targets)
    ]
    assert not bad, "\n".join(bad)


# The pure part of the live-migration engine: it decides from the caller's measurements.
PURE_MIGRATION = ("migration.planner", "migration.stats")


def test_the_migration_engine_does_not_know_the_agent():
    """migration/ is handed what it uses of a replica and of its host through the Protocols
    of migration/interface.py; it imports no daemon and no command line, not even for
    annotations."""
    bad = [
        f"{name} imports {module}"
        for name, path in _sources().items()
        if _within(name, ("migration",))
        for module in sorted(_imports(name, path, annotations=True))
        if _within(module, ("failover.agent", "failover.coordinator", "failover.cli"))
    ]
    assert not bad, "\n".join(bad)


def test_the_migration_planner_is_pure():
    bad = _impure_imports(PURE_MIGRATION)
    assert not bad, "\n".join(bad)
