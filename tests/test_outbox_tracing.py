"""Publish middleware and the outbox: it runs once, when the event is stored.

MassTransit and NServiceBus capture the trace context when a message enters the
outbox, so the consumer's span hangs under the producer's transaction. Pigeon
does the same: ``outbox.dispatch`` runs the app's publish middleware around the
insert (in the producer's context), and the relay publishes the stored headers
as they are, without running it a second time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from pigeon.messages import Outgoing
from pigeon.middleware import PublishNext
from pigeon.outbox import Outbox, Relay
from pigeon.outbox.tables import async_url
from pigeon.settings import Settings
from pigeon.tracing import PublishTracing
from tests.conftest import AppFactory, Broker
from tests.outbox_support import pg_name, pg_url
from tests.outboxkit import Shipped, bind_queue, drain_queue, running, wait_published

__all__ = ["pg_name"]


class Stamp:
    """Publish middleware that counts its calls and leaves a header behind."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, outgoing: Outgoing, call_next: PublishNext) -> str:
        self.calls.append(outgoing.message_id)
        outgoing.headers["x-stamp"] = f"stamped-{len(self.calls)}"
        return await call_next(outgoing)


class Refuse:
    async def __call__(self, outgoing: Outgoing, call_next: PublishNext) -> str:
        raise PermissionError(f"{outgoing.event_name} may not leave")


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, pg_name: str) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    return pg_url(pg_name)


async def test_publish_middleware_runs_once_when_the_event_is_stored_in_the_producers_trace(
    db_url: str,
    prefix: str,
    provider: tuple[TracerProvider, InMemorySpanExporter],
    make_app: AppFactory,
    broker: Broker,
    settings: Settings,
) -> None:
    tracer_provider, exporter = provider
    stamp = Stamp()
    app = make_app("shop", publish_middleware=[stamp, PublishTracing(tracer_provider)])
    engine = create_engine(db_url)
    box = Outbox(engine, app=app, table=f"ob_{prefix}", inbox_table=f"ib_{prefix}")
    box.create_tables()
    queue = await bind_queue(broker, settings, f"{broker.prefix}.seen")
    try:
        tracer = tracer_provider.get_tracer("test")
        with tracer.start_as_current_span("checkout") as checkout, Session(engine) as s, s.begin():
            message_id = box.dispatch(s, Shipped(order_id="o-1"), key="o-1")
        async with running(Relay(box, app=app)):
            await wait_published(box)
        (message,) = await drain_queue(queue, 1)
    finally:
        box.metadata.drop_all(engine)
        engine.dispose()

    assert stamp.calls == [message_id]
    assert message.message_id == message_id
    assert message.headers["x-stamp"] == "stamped-1"
    (publish,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.PRODUCER]
    assert publish.name == "publish outbox.test.shipped"
    assert publish.parent is not None
    assert publish.parent.span_id == checkout.get_span_context().span_id
    assert publish.context is not None
    trace_id, span_id = publish.context.trace_id, publish.context.span_id
    assert str(message.headers["traceparent"]).startswith(f"00-{trace_id:032x}-{span_id:016x}-")


async def test_the_async_form_runs_publish_middleware_in_the_producers_context(
    db_url: str,
    prefix: str,
    provider: tuple[TracerProvider, InMemorySpanExporter],
    make_app: AppFactory,
    broker: Broker,
    settings: Settings,
) -> None:
    tracer_provider, exporter = provider
    stamp = Stamp()
    app = make_app("shop", publish_middleware=[stamp, PublishTracing(tracer_provider)])
    aengine = create_async_engine(async_url(db_url))
    box = Outbox(aengine, app=app, table=f"ob_{prefix}", inbox_table=f"ib_{prefix}")
    await box.create_tables_async()
    queue = await bind_queue(broker, settings, f"{broker.prefix}.seen")
    try:
        with tracer_provider.get_tracer("test").start_as_current_span("checkout"):
            async with AsyncSession(aengine) as s, s.begin():
                first = await box.dispatch_async(s, Shipped(order_id="o-1", seq=1))
                second = await box.dispatch_async(s, Shipped(order_id="o-1", seq=2))
        async with running(Relay(box)):
            await wait_published(box)
        messages = await drain_queue(queue, 2)
    finally:
        async with aengine.begin() as conn:
            await conn.run_sync(box.metadata.drop_all)
        await aengine.dispose()

    assert stamp.calls == [first, second]
    assert [m.headers["x-stamp"] for m in messages] == ["stamped-1", "stamped-2"]
    spans = {s.attributes["messaging.message.id"]: s for s in exporter.get_finished_spans()
             if s.kind == SpanKind.PRODUCER and s.attributes}  # fmt: skip
    for message in messages:
        span = spans[str(message.message_id)]
        assert span.context is not None
        assert f"{span.context.span_id:016x}" in str(message.headers["traceparent"])


async def test_a_publish_middleware_that_raises_stores_nothing(
    db_url: str, prefix: str, make_app: AppFactory
) -> None:
    app = make_app("shop", publish_middleware=[Refuse()])
    engine = create_engine(db_url)
    box = Outbox(engine, app=app, table=f"ob_{prefix}", inbox_table=f"ib_{prefix}")
    box.create_tables()
    try:
        with pytest.raises(PermissionError, match="may not leave"), Session(engine) as s, s.begin():
            box.dispatch(s, Shipped(order_id="o-1"))
        with Session(engine) as s, s.begin():
            with contextlib.suppress(PermissionError):
                box.dispatch(s, Shipped(order_id="o-2"))
            rows = s.execute(box.table.select()).all()
    finally:
        box.metadata.drop_all(engine)
        engine.dispose()
    assert rows == []
