"""Dispatch → listener round trips over the real broker."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aio_pika

from pigeon import Context, Event, headers
from tests.conftest import AppFactory, Broker, RunWorker, eventually
from tests.events import OrderCancelled, OrderPlaced, ShipmentReady


async def test_typed_listener_receives_the_event_it_was_dispatched(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("notification")
    seen: list[tuple[OrderPlaced, Context]] = []

    @app.listener(OrderPlaced)
    async def send_confirmation(event: OrderPlaced, ctx: Context) -> None:
        seen.append((event, ctx))

    await run_worker(app)
    message_id = await app.dispatch_async(OrderPlaced(order_id="o-1", total_cents=1250))
    await eventually(lambda: len(seen) == 1)
    event, ctx = seen[0]
    assert event == OrderPlaced(order_id="o-1", total_cents=1250)
    assert ctx.message_id == message_id
    assert ctx.event_name == "test.order.placed"
    assert ctx.correlation_id == message_id
    assert ctx.attempt == 1
    assert ctx.redelivered is False
    assert ctx.queue == f"{app.service}.send-confirmation"


async def test_untyped_dispatch_reaches_a_dict_listener(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("audit")
    seen: list[dict[str, Any]] = []

    @app.listener("test.order.placed")
    def audit(payload: dict[str, Any], ctx: Context) -> None:
        seen.append(payload)

    await run_worker(app)
    await app.dispatch_async("test.order.placed", {"order_id": "o-2", "extra": [1, 2]})
    await eventually(lambda: len(seen) == 1)
    assert seen == [{"order_id": "o-2", "extra": [1, 2]}]


async def test_pattern_listener_gets_every_matching_event_as_its_type(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("audit")
    seen: list[Event] = []

    @app.listener("test.order.*")
    async def orders(event: Event) -> None:
        seen.append(event)

    worker = await run_worker(app)
    await app.dispatch_async(OrderPlaced(order_id="o-3"))
    await app.dispatch_async(OrderCancelled(order_id="o-3"))
    await app.dispatch_async(ShipmentReady(order_id="o-3"))
    await worker.join(timeout=30)
    assert sorted(type(e).__name__ for e in seen) == ["OrderCancelled", "OrderPlaced"]


async def test_three_services_each_get_every_order(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    got: dict[str, list[str]] = {"notification": [], "seller": [], "logistics": []}
    for service in got:
        app = make_app(service)

        @app.listener(OrderPlaced, name="on-order")
        async def handle(event: OrderPlaced, ctx: Context, _service: str = service) -> None:
            got[_service].append(event.order_id)

        await run_worker(app)
    producer = make_app("orders")
    ids = [f"o-{i}" for i in range(20)]
    await asyncio.gather(*(producer.dispatch_async(OrderPlaced(order_id=i)) for i in ids))
    await eventually(lambda: all(len(v) == 20 for v in got.values()))
    assert all(sorted(v) == sorted(ids) for v in got.values())
    await producer.close()


async def test_a_plain_aio_pika_publisher_is_understood(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("notification")
    seen: list[tuple[OrderPlaced, Context]] = []

    @app.listener(OrderPlaced)
    async def send_confirmation(event: OrderPlaced, ctx: Context) -> None:
        seen.append((event, ctx))

    await run_worker(app)
    channel = await broker.connection.channel()
    exchange = await channel.get_exchange(app.settings.exchange)
    await exchange.publish(
        aio_pika.Message(json.dumps({"order_id": "from-elsewhere"}).encode()),
        routing_key="test.order.placed",
    )
    await eventually(lambda: len(seen) == 1)
    event, ctx = seen[0]
    assert event.order_id == "from-elsewhere"
    assert ctx.event_name == "test.order.placed"
    assert ctx.message_id


async def test_a_pigeon_dispatch_is_readable_by_a_plain_consumer(
    make_app: AppFactory, broker: Broker
) -> None:
    app = make_app("orders")
    await app.declare()
    channel = await broker.connection.channel()
    queue = await channel.declare_queue(f"{broker.prefix}.plain", exclusive=True)
    await queue.bind(app.settings.exchange, "test.order.placed")
    message_id = await app.dispatch_async(
        OrderPlaced(order_id="o-9"), correlation_id="corr-1", headers={"x-tenant": "acme"}
    )
    message = await broker.get(queue.name)
    assert json.loads(message.body) == {
        "order_id": "o-9",
        "customer_email": "customer@example.com",
        "total_cents": 500,
    }
    assert message.routing_key == "test.order.placed"
    assert message.message_id == message_id
    assert message.type == "test.order.placed"
    assert message.app_id == app.service
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.correlation_id == "corr-1"
    assert message.timestamp is not None
    assert message.headers["x-tenant"] == "acme"
    assert message.headers[headers.EVENT_VERSION] == 1
    await app.close()


async def test_ctx_dispatch_carries_correlation_and_causation(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    seller = make_app("seller")
    shipped: list[Context] = []

    @seller.listener(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        await ctx.dispatch(ShipmentReady(order_id=event.order_id))

    @seller.listener(ShipmentReady)
    def on_shipment(event: ShipmentReady, ctx: Context) -> None:
        shipped.append(ctx)

    await run_worker(seller)
    first = await seller.dispatch_async(OrderPlaced(order_id="o-5"), correlation_id="order-o-5")
    await eventually(lambda: len(shipped) == 1)
    assert shipped[0].correlation_id == "order-o-5"
    assert shipped[0].causation_id == first


async def test_sync_handler_can_dispatch_with_dispatch_sync(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("seller")
    shipped: list[str] = []

    @app.listener(OrderPlaced)
    def reserve(event: OrderPlaced, ctx: Context) -> None:
        ctx.dispatch_sync(ShipmentReady(order_id=event.order_id))

    @app.listener(ShipmentReady)
    async def on_shipment(event: ShipmentReady) -> None:
        shipped.append(event.order_id)

    await run_worker(app)
    await app.dispatch_async(OrderPlaced(order_id="o-6"))
    await eventually(lambda: shipped == ["o-6"])
