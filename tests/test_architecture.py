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
            "metrics",
            "tables",
        },
    ),
    ("idempotency", {"idempotency"}),
    ("core", {"core"}),
    ("middleware", {"middleware"}),
    ("amqp", {"amqp"}),
    ("app", {"bridge", "app"}),
    ("outbox", {"outbox"}),
    ("worker", {"worker"}),
    ("tools", {"__main__", "cli", "testing", "asyncapi", "pytest_plugin"}),
    (
        "compat",
        {
            "",
            "acks",
            "connection",
            "delivery",
            "dispatch",
            "frames",
            "hints",
            "idle",
            "listener",
            "messages",
            "pipeline",
            "publishes",
            "settle",
            "threads",
            "topology",
            "tracing",
            "unmarshal",
        },
    ),
]
"""Lowest first; a module's name without ``pigeon.`` (``""`` is the package itself). A
subpackage's name covers its modules (``amqp`` is ``pigeon.amqp`` and ``pigeon.amqp.*``).

``compat`` holds the façade (``pigeon`` itself) and the old import paths,
re-exports kept for one release: on top, so no module of the package imports them. A module that is in no layer yet (a
new one) is held only to the no-cycle rule: add it here and to
docs/architecture.md."""

AMQP_LIBRARIES = ("aiormq", "pamqp")
AMQP_PACKAGE = "amqp"
"""The one subpackage that touches aiormq or pamqp; above it, the package reaches the
broker only through the names ``pigeon.amqp`` exports (its ``__init__``)."""


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


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of ``module`` (a full name), or of its subpackage."""
    name = short(module)
    while True:
        for index, (_, names) in enumerate(LAYERS):
            if name in names:
                return index
        if "." not in name:
            return None
        name = name.rpartition(".")[0]


def test_each_module_imports_only_its_layer_and_the_layers_below() -> None:
    wrong = []
    for module, targets in import_graph().items():
        here = layer_of(module)
        for target in targets:
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                wrong.append(f"{module} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
    assert not wrong, "imports that go up a layer:\n" + "\n".join(sorted(wrong))


def test_the_layers_name_existing_modules_once() -> None:
    listed = [name for _, names in LAYERS for name in names]
    assert len(listed) == len(set(listed))
    assert set(listed) <= {short(module) for module in modules()}
    unplaced = sorted(
        module for module in modules() if layer_of(module) is None and ".outbox" not in module
    )
    assert not unplaced, f"modules in no layer: {unplaced}"


def in_amqp(module: str) -> bool:
    name = short(module)
    return name == AMQP_PACKAGE or name.startswith(AMQP_PACKAGE + ".")


def test_aiormq_and_pamqp_stay_in_the_amqp_subpackage() -> None:
    users = {
        module for module, path in modules().items() if external_imports(path) & set(AMQP_LIBRARIES)
    }
    outside = sorted(module for module in users if not in_amqp(module))
    assert not outside, f"aiormq/pamqp imported outside pigeon.amqp: {outside}"
    assert users, "the checker sees the amqp subpackage's own imports"


def test_the_layers_above_reach_the_broker_only_through_the_amqp_interface() -> None:
    """``from pigeon.amqp import Publisher``, never ``pigeon.amqp.publisher``: the
    subpackage's ``__init__`` is its interface (the old paths in ``compat`` aside)."""
    compat = LAYERS[-1][1]
    wrong = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if not in_amqp(module) and short(module) not in compat
        for target in targets
        if in_amqp(target) and short(target) != AMQP_PACKAGE
    ]
    assert not wrong, "imports past pigeon.amqp's interface:\n" + "\n".join(sorted(wrong))


def test_the_graph_sees_type_only_and_function_level_imports() -> None:
    """The checker itself: an import under TYPE_CHECKING or inside a def is an edge."""
    graph = import_graph()
    assert "pigeon.settings" in graph["pigeon.idempotency"]  # a top-level import
    assert "pigeon.idempotency.memory" in graph["pigeon.idempotency"]  # inside a function
    assert "pigeon.core.messages" in graph["pigeon.amqp.frames"]  # under TYPE_CHECKING
    assert "pigeon.idempotency" in graph["pigeon.core.processor"]  # its __init__ runs too
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def private_names(tree: ast.AST) -> tuple[set[str], list[tuple[int, str]]]:
    """The ``_names`` a module defines (defs, classes, assignments, ``self._x = ...``), and
    each ``something._name`` it reads where ``something`` is not ``self`` or ``cls``."""
    defined: set[str] = set()
    read: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute):
            if isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                read.append((node.lineno, node.attr))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
    private = {name for name in defined if name.startswith("_") and not name.startswith("__")}
    reads = [(line, name) for line, name in read if name.startswith("_") and name[1:2] != "_"]
    return private, reads


def cross_module_private_reads(sources: dict[str, str]) -> list[str]:
    """``module:line reads _name``, where ``_name`` is another pigeon module's, not its own."""
    parsed = {module: private_names(ast.parse(source)) for module, source in sources.items()}
    wrong = []
    for module, (own, reads) in parsed.items():
        others = set().union(*(p for m, (p, _) in parsed.items() if m != module))
        wrong += [
            f"{module}:{line} reads {name}"
            for line, name in reads
            if name not in own and name in others
        ]
    return wrong


def test_no_module_reads_another_modules_private_attributes() -> None:
    """What a module needs of another is public (``Pigeon.close_runtime``,
    ``pigeon.app.sink``), so a private attribute can change with its own module."""
    sources = {module: path.read_text() for module, path in modules().items()}
    wrong = cross_module_private_reads(sources)
    assert not wrong, "private attributes read across modules:\n" + "\n".join(sorted(wrong))


def test_the_private_read_check_sees_one() -> None:
    sources = {
        "a": "class A:\n    def __init__(self):\n        self._runtimes = {}\n",
        "b": "def close(app):\n    app._runtimes.pop(1)\n",
        "c": "def close(app):\n    app._other.pop(1)\n",
    }
    assert cross_module_private_reads(sources) == ["b:2 reads _runtimes"]
