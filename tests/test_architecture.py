"""The package's shape: no import cycles in pigeon/, type-only imports included, and
each module imports only its own layer or the layers below.

See docs/architecture.md for the layers and the rule this enforces. The graph
is read from the source (ast), not from ``sys.modules``, so an import inside a
function or under ``if TYPE_CHECKING:`` counts like one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pigeon"

LAYERS: list[tuple[str, set[str]]] = [
    (
        "leaves",
        {
            "errors",
            "headers",
            "settings",
            "logs",
            "events",
            "retry",
            "deadletter",
            "messages",
            "pipeline",
            "metrics",
        },
    ),
    (
        "idempotency",
        {
            "idempotency",
            "idempotency.base",
            "idempotency.lease",
            "idempotency.memory",
            "idempotency.sqlite",
            "idempotency.redis",
            "idempotency.postgres",
        },
    ),
    ("core", {"listener", "delivery"}),
    ("middleware", {"middleware", "tracing"}),
    ("amqp", {"connection", "topology", "frames", "acks", "publishes", "dispatch"}),
    ("app", {"app"}),
    ("worker", {"idle", "settle", "worker"}),
    ("tools", {"", "__main__", "cli", "testing", "asyncapi", "pytest_plugin"}),
]
"""Lowest first; a module's name without ``pigeon.`` (``""`` is the package itself).

A module that is in no layer yet (a new one) is held only to the no-cycle
rule: add it here and to docs/architecture.md."""

AMQP_LIBRARIES = ("aiormq", "pamqp")
AMQP_MODULES = {
    "acks",
    "connection",
    "dispatch",
    "frames",
    "publishes",
    "topology",
    "unmarshal",
    "worker",
}
"""The modules that touch aiormq or pamqp. The list may shrink, never grow: the
next step moves them into one ``pigeon/amqp/`` subpackage."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The pigeon module ``name`` refers to: itself, or the package that holds it."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every pigeon module ``module`` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from pigeon import headers`` imports the submodule pigeon.headers
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            target = resolve(name, known)
            # a package's own submodules do not make it import itself
            if target is not None and target != module:
                found.add(target)
                found.update(_parents(target, module, known))
    return found


def _parents(target: str, importer: str, known: dict[str, Path]) -> set[str]:
    """The subpackages whose ``__init__`` importing ``target`` runs (``pigeon`` itself aside)."""
    parents: set[str] = set()
    parent = target.rpartition(".")[0]
    while parent.count("."):
        if parent in known and not importer.startswith(parent + ".") and importer != parent:
            parents.add(parent)
        parent = parent.rpartition(".")[0]
    return parents


def external_imports(path: Path) -> set[str]:
    """The top-level names of every module ``path`` imports (``aiormq`` for ``aiormq.abc``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imports_of(module, path, known) for module, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles in pigeon/ (type-only imports count):\n" + "\n".join(
        " <-> ".join(component) for component in found
    )


def short(module: str) -> str:
    return module.removeprefix("pigeon").removeprefix(".")


def test_each_module_imports_only_its_layer_and_the_layers_below() -> None:
    layer_of = {name: index for index, (_, names) in enumerate(LAYERS) for name in names}
    wrong = []
    for module, targets in import_graph().items():
        here = layer_of.get(short(module))
        for target in targets:
            there = layer_of.get(short(target))
            if here is not None and there is not None and there > here:
                wrong.append(f"{module} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
    assert not wrong, "imports that go up a layer:\n" + "\n".join(sorted(wrong))


def test_the_layers_name_existing_modules_once() -> None:
    listed = [name for _, names in LAYERS for name in names]
    assert len(listed) == len(set(listed))
    assert set(listed) <= {short(module) for module in modules()}


def test_aiormq_and_pamqp_stay_in_the_amqp_modules() -> None:
    users = {
        short(module)
        for module, path in modules().items()
        if external_imports(path) & set(AMQP_LIBRARIES)
    }
    assert users <= AMQP_MODULES, f"new aiormq/pamqp users: {sorted(users - AMQP_MODULES)}"


def test_the_graph_sees_type_only_and_function_level_imports() -> None:
    """The checker itself: an import under TYPE_CHECKING or inside a def is an edge."""
    graph = import_graph()
    assert "pigeon.settings" in graph["pigeon.idempotency"]  # a top-level import
    assert "pigeon.idempotency.memory" in graph["pigeon.idempotency"]  # inside a function
    assert "pigeon.messages" in graph["pigeon.frames"]  # under TYPE_CHECKING
    assert "pigeon.idempotency" in graph["pigeon.delivery"]  # its __init__ runs too
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
