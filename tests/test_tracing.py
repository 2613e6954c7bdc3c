"""OpenTelemetry tracing over the real broker, recorded by the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import FieldValue
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pigeon import Context, Pigeon, Retry, RetryLater, headers
from pigeon.middleware import Metrics, tracing
from pigeon.testing import deliver, fake
from pigeon.tracing import PublishTracing, Tracing
from tests.conftest import AppFactory, Broker, RunWorker, eventually
from tests.events import OrderPlaced, ShipmentReady


class CardDeclined(Exception):
    pass


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def traced(app_factory: AppFactory, service: str, provider: TracerProvider) -> Pigeon:
    """An app whose tracing middleware records to ``provider`` instead of the global one."""
    return app_factory(
        service,
        middleware=[Tracing(provider), Metrics()],
        publish_middleware=[PublishTracing(provider)],
    )


def by_name(spans: Sequence[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    span_id: int = span.context.span_id
    return span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    trace_id: int = span.context.trace_id
    return trace_id


def test_apps_trace_by_default_when_opentelemetry_is_importable() -> None:
    app = Pigeon(service="orders")
    assert isinstance(app.middleware[0], Tracing), "tracing is the outermost middleware"
    assert any(isinstance(m, Metrics) for m in app.middleware)
    assert [type(m) for m in app.publish_middleware] == [PublishTracing]


async def test_a_dispatch_its_handler_and_the_event_it_dispatches_form_one_trace(
    make_app: AppFactory,
    run_worker: RunWorker,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    seller = traced(make_app, "seller", provider)
    tracer = provider.get_tracer("shop")
    shipped: list[Context] = []

    @seller.listener(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        with tracer.start_as_current_span("reserve stock"):
            pass
        await ctx.dispatch(ShipmentReady(order_id=event.order_id))

    @seller.listener(ShipmentReady)
    def book_courier(event: ShipmentReady, ctx: Context) -> None:  # sync: runs in a thread
        with tracer.start_as_current_span("book courier"):
            shipped.append(ctx)

    await run_worker(seller)
    first = await seller.dispatch_async(OrderPlaced(order_id="o-1"), correlation_id="order-o-1")
    await eventually(lambda: len(exporter.get_finished_spans()) == 6, message="six spans")

    spans = by_name(exporter.get_finished_spans())
    assert sorted(spans) == [
        "book courier",
        "process test.order.placed",
        "process test.shipment.ready",
        "publish test.order.placed",
        "publish test.shipment.ready",
        "reserve stock",
    ]
    assert len({trace_id(s) for s in spans.values()}) == 1, "one trace across both hops"
    placed = spans["publish test.order.placed"]
    handled = spans["process test.order.placed"]
    shipment = spans["publish test.shipment.ready"]
    shipment_handled = spans["process test.shipment.ready"]
    assert placed.parent is None
    assert parent_id(handled) == span_id(placed)
    assert parent_id(spans["reserve stock"]) == span_id(handled)
    assert parent_id(shipment) == span_id(handled)
    assert parent_id(shipment_handled) == span_id(shipment)
    assert parent_id(spans["book courier"]) == span_id(shipment_handled)
    assert [placed.kind, handled.kind] == [SpanKind.PRODUCER, SpanKind.CONSUMER]

    assert placed.attributes == {
        "messaging.system": "rabbitmq",
        "messaging.operation": "publish",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": seller.settings.exchange,
        "messaging.rabbitmq.destination.routing_key": "test.order.placed",
        "messaging.message.id": first,
        "messaging.message.conversation_id": "order-o-1",
        "messaging.message.body.size": len(OrderPlaced(order_id="o-1").to_json()),
        "pigeon.service": seller.service,
    }
    assert handled.attributes is not None
    assert handled.attributes["messaging.operation"] == "process"
    assert handled.attributes["messaging.system"] == "rabbitmq"
    assert handled.attributes["messaging.destination.name"] == seller.settings.exchange
    assert handled.attributes["messaging.rabbitmq.destination.routing_key"] == "test.order.placed"
    assert handled.attributes["messaging.message.id"] == first
    assert handled.attributes["messaging.message.conversation_id"] == "order-o-1"
    assert handled.attributes["pigeon.queue"] == reserve.queue
    assert handled.attributes["pigeon.attempt"] == 1
    assert shipment_handled.attributes is not None
    assert shipment_handled.attributes["messaging.message.conversation_id"] == "order-o-1"
    assert shipment_handled.attributes["pigeon.causation_id"] == first
    assert handled.status.status_code is StatusCode.UNSET

    version, trace, parent, _flags = str(shipped[0].headers[headers.TRACEPARENT]).split("-")
    assert (version, trace, parent) == (
        "00",
        f"{trace_id(shipment):032x}",
        f"{span_id(shipment):016x}",
    )


async def test_a_sync_handler_dispatch_sync_nests_under_its_consumer_span(
    make_app: AppFactory,
    run_worker: RunWorker,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    seller = traced(make_app, "seller", provider)
    done: list[str] = []

    @seller.listener(OrderPlaced)
    def reserve(event: OrderPlaced, ctx: Context) -> None:
        ctx.dispatch_sync(ShipmentReady(order_id=event.order_id))

    @seller.listener(ShipmentReady)
    async def ship(event: ShipmentReady) -> None:
        done.append(event.order_id)

    await run_worker(seller)
    await seller.dispatch_async(OrderPlaced(order_id="o-2"))
    await eventually(lambda: len(exporter.get_finished_spans()) == 4, message="four spans")
    spans = by_name(exporter.get_finished_spans())
    shipment = spans["publish test.shipment.ready"]
    assert parent_id(shipment) == span_id(spans["process test.order.placed"])
    assert parent_id(spans["process test.shipment.ready"]) == span_id(shipment)


async def test_a_failing_handler_records_the_exception_and_an_error_status(
    make_app: AppFactory,
    run_worker: RunWorker,
    broker: Broker,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    billing = traced(make_app, "billing", provider)

    @billing.listener(OrderPlaced, retry=Retry(attempts=1))
    async def charge(event: OrderPlaced) -> None:
        raise CardDeclined(f"card declined for {event.order_id}")

    await run_worker(billing)
    await billing.dispatch_async(OrderPlaced(order_id="o-3"))
    letter = await broker.get(billing.settings.dead_letter_queue)
    assert letter.headers[headers.REASON] == "handler-error"

    await eventually(lambda: len(exporter.get_finished_spans()) == 2, message="two spans")
    handled = by_name(exporter.get_finished_spans())["process test.order.placed"]
    assert handled.status.status_code is StatusCode.ERROR
    assert handled.status.description == "CardDeclined: card declined for o-3"
    assert handled.attributes is not None
    assert handled.attributes["error.type"] == "tests.test_tracing.CardDeclined"
    [event] = handled.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "tests.test_tracing.CardDeclined"
    assert event.attributes["exception.message"] == "card declined for o-3"
    assert "raise CardDeclined" in str(event.attributes["exception.stacktrace"])


async def test_a_traceparent_from_another_publisher_is_the_parent_of_the_handler_span(
    make_app: AppFactory,
    run_worker: RunWorker,
    broker: Broker,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    app = traced(make_app, "notification", provider)

    @app.listener(OrderPlaced)
    async def send_confirmation(event: OrderPlaced) -> None:
        pass

    await run_worker(app)
    upstream_trace, upstream_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    channel = await broker.connection.channel()
    exchange = await channel.get_exchange(app.settings.exchange)
    traceparent: dict[str, FieldValue] = {
        headers.TRACEPARENT: f"00-{upstream_trace}-{upstream_span}-01"
    }
    for message_id, extra in (("m-traced", traceparent), ("m-untraced", {})):
        await exchange.publish(
            aio_pika.Message(b'{"order_id": "o-6"}', message_id=message_id, headers=extra),
            routing_key="test.order.placed",
        )
    await channel.close()
    await eventually(lambda: len(exporter.get_finished_spans()) == 2, message="two spans")

    spans = {
        str((s.attributes or {})["messaging.message.id"]): s for s in exporter.get_finished_spans()
    }
    continued, fresh = spans["m-traced"], spans["m-untraced"]
    assert f"{trace_id(continued):032x}" == upstream_trace
    assert parent_id(continued) == int(upstream_span, 16)
    assert continued.parent is not None
    assert continued.parent.is_remote
    assert fresh.parent is None, "a message without traceparent starts a new trace"
    assert trace_id(fresh) != trace_id(continued)


async def test_retry_later_is_an_event_on_the_span_not_an_error(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = Pigeon(service="stock", middleware=[Tracing(provider)])

    @app.listener(OrderPlaced)
    async def reserve(event: OrderPlaced) -> None:
        raise RetryLater(5, "warehouse closed")

    outcome = await deliver(app, OrderPlaced(order_id="o-4"))
    assert outcome.retried
    [span] = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET
    assert [e.name for e in span.events] == ["pigeon.retry_later"]


async def test_without_opentelemetry_tracing_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    monkeypatch.setattr(tracing, "AVAILABLE", False)
    default = Pigeon(service="orders")
    assert not any(isinstance(m, Tracing) for m in default.middleware)
    assert default.publish_middleware == []

    app = Pigeon(
        service="orders",
        middleware=[Tracing(provider)],
        publish_middleware=[PublishTracing(provider)],
    )
    handled: list[dict[str, Any]] = []

    @app.listener("test.order.placed")
    async def audit(payload: dict[str, Any]) -> None:
        handled.append(payload)

    with fake() as bus:
        await app.dispatch_async(OrderPlaced(order_id="o-5"))
    [dispatched] = bus.dispatched()
    assert headers.TRACEPARENT not in dispatched.headers
    outcome = await deliver(app, "test.order.placed", {"order_id": "o-5"})
    assert outcome.acked
    assert handled == [{"order_id": "o-5"}]
    assert exporter.get_finished_spans() == ()


async def test_without_an_sdk_a_handler_passes_the_incoming_trace_on_to_what_it_dispatches() -> (
    None
):
    app = Pigeon(service="seller")  # default middleware, and no global SDK provider in tests

    @app.listener(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        await ctx.dispatch(ShipmentReady(order_id=event.order_id))

    upstream = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with fake() as bus:
        await app.dispatch_async(OrderPlaced(order_id="o-8"))
        await deliver(app, OrderPlaced(order_id="o-8"), headers={headers.TRACEPARENT: upstream})
    plain, caused = bus.dispatched()
    assert headers.TRACEPARENT not in plain.headers, "nothing to propagate, nothing recorded"
    assert caused.headers[headers.TRACEPARENT] == upstream
