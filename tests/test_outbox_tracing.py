"""Publish middleware and the outbox: it runs once, when the event is stored.

MassTransit and NServiceBus capture the trace context when a message enters the
outbox, so the consumer's span hangs under the producer's transaction. Pigeon
does the same: ``outbox.dispatch`` runs the app's publish middleware around the
insert (in the producer's context), and the relay publishes the stored headers
as they are, without running it a second time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from pigeon import Pigeon
from pigeon.messages import Outgoing
from pigeon.middleware import PublishNext
from pigeon.outbox import Outbox
from pigeon.outbox.tables import async_url
from pigeon.settings import Settings
from pigeon.tracing import PublishTracing
from tests.conftest import AppFactory, Broker
from tests.outbox_support import pg_name
from tests.outboxkit import Shipped, bind_queue, db_url, relay_all

__all__ = ["db_url", "pg_name"]


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


@dataclass
class Shop:
    """The "shop" app, its publish middleware ``Stamp`` then ``PublishTracing`` (its
    spans kept in ``exporter``), and a queue of everything it publishes."""

    app: Pigeon
    stamp: Stamp
    tracer_provider: TracerProvider
    exporter: InMemorySpanExporter
    queue: aio_pika.abc.AbstractQueue


@pytest.fixture
async def shop(make_app: AppFactory, broker: Broker, settings: Settings) -> AsyncIterator[Shop]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    stamp = Stamp()
    app = make_app("shop", publish_middleware=[stamp, PublishTracing(tracer_provider)])
    queue = await bind_queue(broker, settings, f"{broker.prefix}.seen")
    yield Shop(app, stamp, tracer_provider, exporter, queue)
    tracer_provider.shutdown()


async def test_publish_middleware_runs_once_when_the_event_is_stored_in_the_producers_trace(
    db_url: str, prefix: str, shop: Shop
) -> None:
    stamp, exporter = shop.stamp, shop.exporter
    engine = create_engine(db_url)
    box = Outbox(engine, app=shop.app, table=f"ob_{prefix}", inbox_table=f"ib_{prefix}")
    box.create_tables()
    try:
        tracer = shop.tracer_provider.get_tracer("test")
        with tracer.start_as_current_span("checkout") as checkout, Session(engine) as s, s.begin():
            message_id = box.dispatch(s, Shipped(order_id="o-1"), key="o-1")
        (message,) = await relay_all(box, shop.queue, 1, app=shop.app)
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
    db_url: str, prefix: str, shop: Shop
) -> None:
    stamp, exporter = shop.stamp, shop.exporter
    aengine = create_async_engine(async_url(db_url))
    box = Outbox(aengine, app=shop.app, table=f"ob_{prefix}", inbox_table=f"ib_{prefix}")
    await box.create_tables_async()
    try:
        with shop.tracer_provider.get_tracer("test").start_as_current_span("checkout"):
            async with AsyncSession(aengine) as s, s.begin():
                first = await box.dispatch_async(s, Shipped(order_id="o-1", seq=1))
                second = await box.dispatch_async(s, Shipped(order_id="o-1", seq=2))
        messages = await relay_all(box, shop.queue, 2)
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
