"""Every documented import keeps working: the names README.md and docs/ import, and the
old paths of the names that moved to leaf modules (see docs/architecture.md)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import pigeon

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

DOCUMENTED = {
    "pigeon": sorted(pigeon.__all__),
    "pigeon.delivery": [
        "Delivery",
        "HandlerTimeout",
        "InvalidMessage",
        "Outcome",
        "OutcomeKind",
        "Processor",
        "Renewal",
    ],
    "pigeon.dispatch": ["RETRYABLE", "Outgoing", "Publisher", "build_outgoing"],
    "pigeon.errors": [
        "ConfigurationError",
        "DispatchError",
        "HandlerTimeout",
        "InvalidMessage",
        "PigeonError",
        "TopologyError",
    ],
    "pigeon.frames": ["Deliveries"],
    "pigeon.headers": ["TRACEPARENT"],
    "pigeon.listener": ["Context", "Listener", "ListenerApp"],
    "pigeon.messages": ["DispatchOptions", "OutboxOptions", "Outcome", "OutcomeKind", "Outgoing"],
    "pigeon.metrics": ["serve_metrics"],
    "pigeon.middleware": [
        "CallNext",
        "Logging",
        "Metrics",
        "Middleware",
        "PublishMiddleware",
        "PublishNext",
        "RateLimit",
        "Timeout",
        "WithoutOverlapping",
        "chain",
        "publish_chain",
    ],
    "pigeon.retry": ["Reject", "Retry", "RetryLater"],
    "pigeon.testing": ["deliver", "fake", "FakeBus", "Dispatched"],
    "pigeon.tracing": ["PublishTracing", "Tracing"],
    "pigeon.asyncapi": ["build", "render"],
    "pigeon.worker": ["Worker"],
    "pigeon.pipeline": ["Wrapper", "chain"],
    "pigeon.idempotency.lease": ["Renewal"],
}


OLD_PATHS: dict[str, list[str]] = {
    "pigeon.acks": ["Acker", "CLOSE_TIMEOUT"],
    "pigeon.app": [
        "Pigeon",
        "Runtime",
        "close",
        "close_runtimes_on",
        "default_app",
        "dispatch",
        "dispatch_async",
        "set_default_app",
        "set_sink",
    ],
    "pigeon.asyncapi": ["ANY_EVENT", "ASYNCAPI_VERSION", "Document", "build", "render"],
    "pigeon.cli": [
        "EX_CONFIG",
        "asyncapi_command",
        "dispatch_command",
        "listen",
        "load_app",
        "main",
        "topology_declare",
        "topology_group",
        "topology_show",
    ],
    "pigeon.connection": [
        "CLUSTER_HEARTBEAT",
        "CONNECT_ERRORS",
        "CONNECT_TIMEOUT",
        "Connector",
        "NEXT_NODE_AFTER",
        "OnConnect",
        "refusal",
    ],
    "pigeon.deadletter": [
        "MAX_EXCEPTION_MESSAGE",
        "MAX_TRACEBACK",
        "dead_letter_headers",
        "describe_exception",
    ],
    "pigeon.delivery": [
        "Delivery",
        "HandlerTimeout",
        "InvalidMessage",
        "NotStarted",
        "Outcome",
        "OutcomeKind",
        "Processor",
        "Renewal",
    ],
    "pigeon.dispatch": [
        "Bridge",
        "MIN_TRY",
        "NODE_ATTEMPT_TIMEOUT",
        "Outgoing",
        "Publisher",
        "RETRYABLE",
        "bridge",
        "build_outgoing",
        "on_bridge_shutdown",
    ],
    "pigeon.errors": [
        "BrokerRefused",
        "ConfigurationError",
        "DispatchError",
        "DispatchManyError",
        "HandlerTimeout",
        "InvalidHeaderError",
        "InvalidMessage",
        "PigeonError",
        "SettingsError",
        "TopologyError",
    ],
    "pigeon.events": ["Event", "encode_payload", "lookup", "registered", "validate_event_name"],
    "pigeon.frames": [
        "APP_ID",
        "CONTENT_ENCODING",
        "CONTENT_TYPE",
        "CORRELATION_ID",
        "DELIVERY_MODE",
        "Deliveries",
        "FRAME_END",
        "HEADERS",
        "Intercepted",
        "MESSAGE_ID",
        "PERSISTENT",
        "ROOM_POLL",
        "TIMESTAMP",
        "TYPE",
        "TurnWriter",
        "USER_ID",
        "attach_deliveries",
        "content",
        "frame",
        "properties",
        "publish_method",
        "room",
        "short_string",
    ],
    "pigeon.headers": [
        "ATTEMPT",
        "ATTEMPTS",
        "CAUSATION_ID",
        "DROPPED_HEADERS",
        "EVENT_VERSION",
        "EXCEPTION_MESSAGE",
        "EXCEPTION_TYPE",
        "FAILED_AT",
        "LISTENER",
        "QUEUE",
        "REASON",
        "REPLAYED_BY",
        "REPLAY_OF",
        "Reason",
        "SERVICE",
        "TRACEBACK",
        "TRACEPARENT",
        "UNDECODABLE",
        "X_DEATH",
        "X_DELIVERY_COUNT",
        "X_FIRST_DEATH_QUEUE",
        "X_FIRST_DEATH_REASON",
    ],
    "pigeon.hints": ["hint_competitors"],
    "pigeon.idle": ["POLL", "QUIET", "ready_messages"],
    "pigeon.listener": [
        "AnyMiddleware",
        "Context",
        "DEFAULT_LEASE",
        "DEFAULT_TIMEOUT",
        "Fallback",
        "Handler",
        "Listener",
        "ListenerApp",
        "SHAPES",
        "TransactionalOutbox",
        "check_fallback",
        "default_listener_name",
        "inspect_handler",
        "pattern_of",
    ],
    "pigeon.logs": ["LibraryLogger", "configure_logging", "get_logger"],
    "pigeon.messages": [
        "DISPATCH_OPTIONS",
        "DispatchOptions",
        "Outcome",
        "OutcomeKind",
        "Outgoing",
    ],
    "pigeon.metrics": ["DISPATCHED", "HANDLER_SECONDS", "IN_FLIGHT", "MESSAGES", "serve_metrics"],
    "pigeon.middleware": [
        "CallNext",
        "KeyFunc",
        "Logging",
        "Metrics",
        "Middleware",
        "PublishMiddleware",
        "PublishNext",
        "RateLimit",
        "Timeout",
        "WithoutOverlapping",
        "chain",
        "publish_chain",
    ],
    "pigeon.pipeline": ["Next", "Wrapper", "chain"],
    "pigeon.publishes": ["METHOD_CACHE", "Publishes"],
    "pigeon.pytest_plugin": ["pigeon_app", "pigeon_fake", "pytest_configure"],
    "pigeon.retry": [
        "DELAY_LADDER",
        "Reject",
        "Retry",
        "RetryLater",
        "tier_delay",
        "tier_label",
        "tier_queue",
    ],
    "pigeon.settings": [
        "IDEMPOTENCY_SCHEMES",
        "Settings",
        "broker_urls",
        "mask_url",
        "settings_error",
    ],
    "pigeon.settle": ["SETTLE_TIMEOUT", "Settler", "login"],
    "pigeon.tables": [
        "MAX_DEPTH",
        "MAX_HEADER_BYTES",
        "check_headers",
        "encode_table",
        "normalise_headers",
        "repair_decoded",
    ],
    "pigeon.testing": ["Dispatched", "FakeBus", "Where", "deliver", "fake"],
    "pigeon.threads": ["HandlerThreads"],
    "pigeon.topology": [
        "Binding",
        "DEFAULT_DELIVERY_LIMIT",
        "ExchangeSpec",
        "GROUP_SIZE",
        "QueueSpec",
        "Topology",
        "core_topology",
        "declare",
        "explain_mismatch",
        "listener_queue",
        "matches",
        "retry_tier",
    ],
    "pigeon.tracing": [
        "AVAILABLE",
        "Attributes",
        "PublishTracing",
        "SCOPE",
        "Tracing",
        "default_middleware",
        "default_publish_middleware",
    ],
    "pigeon.unmarshal": ["UndecodableHeader", "install", "problems_of", "unmarshal"],
    "pigeon.worker": [
        "CONSUMER_CHECK_INTERVAL",
        "PREFETCH_PER_HANDLER",
        "PURGE_INTERVAL",
        "Worker",
        "rss_mb",
    ],
}
"""Every public name of every module of the flat layout (before pigeon/ became layered
directories, see docs/architecture.md): each path keeps working for one release, as a
re-export where its module moved."""


def doc_imports() -> list[tuple[str, str, str]]:
    """(document, module, name) for each ``from pigeon... import`` in a Python block."""
    found: list[tuple[str, str, str]] = []
    for doc in DOCS:
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.splitlines():
                if not re.match(r"\s*from (pigeon|letterthief)[\w.]* import ", line):
                    continue
                node = ast.parse(line.strip()).body[0]
                assert isinstance(node, ast.ImportFrom)
                assert node.module is not None
                found.extend((doc.name, node.module, a.name) for a in node.names)
    return found


@pytest.mark.parametrize(
    ("module", "name"), [(m, n) for m, names in DOCUMENTED.items() for n in names]
)
def test_a_documented_name_imports(module: str, name: str) -> None:
    assert getattr(importlib.import_module(module), name) is not None


def test_every_import_in_the_docs_works() -> None:
    found = doc_imports()
    assert found, "the docs have Python blocks that import pigeon"
    for doc, module, name in found:
        assert hasattr(importlib.import_module(module), name), f"{doc}: {module}.{name}"


def test_moved_names_are_the_same_objects_at_their_old_paths() -> None:
    from pigeon import delivery, errors, messages, middleware, pipeline
    from pigeon.idempotency import lease

    dispatch = importlib.import_module("pigeon.dispatch")  # pigeon.dispatch is also a function
    assert dispatch.Outgoing is messages.Outgoing
    assert delivery.Outcome is messages.Outcome
    assert delivery.OutcomeKind is messages.OutcomeKind
    assert delivery.HandlerTimeout is errors.HandlerTimeout
    assert delivery.InvalidMessage is errors.InvalidMessage
    assert delivery.Renewal is lease.Renewal
    assert middleware.chain is pipeline.chain
    assert middleware.publish_chain is pipeline.chain


@pytest.mark.parametrize("module", sorted(OLD_PATHS))
def test_an_old_module_path_still_imports_with_its_public_names(module: str) -> None:
    imported = importlib.import_module(module)
    missing = [name for name in OLD_PATHS[module] if not hasattr(imported, name)]
    assert not missing, f"{module} lost {missing}"


def test_the_old_paths_are_the_same_objects_as_the_new_ones() -> None:
    from pigeon import amqp, bridge, middleware
    from pigeon.amqp import consume, frames, publisher
    from pigeon.core import processor, topology
    from pigeon.worker import loop, settle

    old = {name: importlib.import_module(f"pigeon.{name}") for name in ("dispatch", "worker")}
    assert old["dispatch"].Publisher is publisher.Publisher is amqp.Publisher
    assert old["dispatch"].bridge is bridge.bridge
    assert importlib.import_module("pigeon.frames").Deliveries is frames.Deliveries
    assert importlib.import_module("pigeon.topology").Topology is topology.Topology
    assert importlib.import_module("pigeon.topology").declare is amqp.declare
    assert importlib.import_module("pigeon.delivery").Processor is processor.Processor
    assert importlib.import_module("pigeon.settle").Settler is settle.Settler
    assert importlib.import_module("pigeon.tracing").Tracing is middleware.tracing.Tracing
    assert old["worker"].Worker is loop.Worker
    assert consume.Subscription is amqp.Subscription


def test_the_old_paths_import_no_amqp_library_themselves() -> None:
    """A re-export only names pigeon modules: aiormq stays behind pigeon.amqp."""
    from tests.test_architecture import external_imports, modules

    for module, path in modules().items():
        if module.removeprefix("pigeon.") in OLD_PATHS_MOVED:
            assert not external_imports(path) - {"pigeon"}, f"{module} imports more than pigeon"


OLD_PATHS_MOVED = {
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
}
"""The old modules that became re-exports (``pigeon.middleware`` and ``pigeon.worker``
became packages)."""


def test_the_top_level_names_are_sorted() -> None:
    assert pigeon.__all__ == sorted(pigeon.__all__)


async def test_an_unknown_dispatch_keyword_is_refused_before_anything_is_sent() -> None:
    from pigeon.testing import fake

    app = pigeon.Pigeon(service="names")
    with fake() as bus, pytest.raises(TypeError, match="massage_id"):
        await app.dispatch_async("order.placed", {}, massage_id="m-1")  # type: ignore[call-arg]
    bus.assert_nothing_dispatched()
