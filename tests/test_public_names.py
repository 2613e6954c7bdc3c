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


def test_the_top_level_names_are_sorted() -> None:
    assert pigeon.__all__ == sorted(pigeon.__all__)


async def test_an_unknown_dispatch_keyword_is_refused_before_anything_is_sent() -> None:
    from pigeon.testing import fake

    app = pigeon.Pigeon(service="names")
    with fake() as bus, pytest.raises(TypeError, match="massage_id"):
        await app.dispatch_async("order.placed", {}, massage_id="m-1")  # type: ignore[call-arg]
    bus.assert_nothing_dispatched()
