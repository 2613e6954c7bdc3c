"""Connections die: the worker and the dispatcher come back by themselves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial
from types import SimpleNamespace
from typing import cast

import pytest
from aio_pika.abc import AbstractConnection
from structlog.testing import capture_logs

from pigeon import Context, Pigeon
from pigeon.connection import Connector
from pigeon.dispatch import RETRYABLE
from pigeon.worker import Worker
from tests.conftest import AMQP_URL, AppFactory, Broker, RunWorker, eventually, unique_settings
from tests.events import OrderPlaced
from tests.tcpproxy import TcpProxy


def reconnected(worker: Worker, before: int) -> bool:
    return worker.connections > before


def contains(items: list[str], item: str) -> bool:
    return item in items


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    p = TcpProxy()
    await p.start()
    yield p
    await p.stop()


async def test_the_worker_resumes_consuming_after_its_connection_is_cut(
    proxy: TcpProxy, prefix: str, broker: Broker, run_worker: RunWorker
) -> None:
    settings = unique_settings(prefix, url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
    app = Pigeon(service=f"{prefix}-notification", settings=settings)
    broker.apps.append(app)
    producer = Pigeon(service=f"{prefix}-orders", settings=unique_settings(prefix))
    seen: list[str] = []

    @app.listener(OrderPlaced)
    async def send(event: OrderPlaced, ctx: Context) -> None:
        seen.append(event.order_id)

    worker = await run_worker(app)
    await producer.dispatch_async(OrderPlaced(order_id="before"))
    await eventually(lambda: seen == ["before"])
    for round_ in range(3):
        before = worker.connections
        await proxy.cut()
        await eventually(partial(reconnected, worker, before), message="worker reconnected")
        await eventually(worker.ready.is_set, timeout=30, message="worker consuming again")
        await producer.dispatch_async(OrderPlaced(order_id=f"after-{round_}"))
        await eventually(partial(contains, seen, f"after-{round_}"), timeout=15)
    assert seen == ["before", "after-0", "after-1", "after-2"]
    assert proxy.connections >= 4
    await producer.close()


async def test_a_worker_started_while_the_broker_is_away_waits_and_then_consumes(
    prefix: str, broker: Broker
) -> None:
    port = TcpProxy.free_port()
    settings = unique_settings(prefix, url=f"amqp://guest:guest@127.0.0.1:{port}/")
    app = Pigeon(service=f"{prefix}-notification", settings=settings)
    broker.apps.append(app)
    seen: list[str] = []

    @app.listener(OrderPlaced)
    async def send(event: OrderPlaced) -> None:
        seen.append(event.order_id)

    worker = Worker(app, handle_signals=False, shutdown_timeout=5)
    with capture_logs() as logs:
        task = asyncio.create_task(worker.run())
        await eventually(  # each attempt is logged
            lambda: sum(e["event"] == "broker.unreachable" for e in logs) >= 2 or task.done(),
            timeout=30,
        )
    assert not task.done(), "the worker keeps trying instead of exiting"
    attempts = [e for e in logs if e["event"] == "broker.unreachable"]
    assert all("guest:guest" not in str(e) for e in attempts)
    proxy = TcpProxy(port=port)
    await proxy.start()
    try:
        await asyncio.wait_for(worker.ready.wait(), 45)
        producer = Pigeon(service=f"{prefix}-orders", settings=unique_settings(prefix))
        await producer.dispatch_async(OrderPlaced(order_id="late"))
        await eventually(lambda: seen == ["late"])
        await producer.close()
    finally:
        worker.stop()
        assert await asyncio.wait_for(task, 20) == 0
        await proxy.stop()


async def test_dispatch_rides_out_a_cut_connection(
    proxy: TcpProxy, prefix: str, broker: Broker
) -> None:
    settings = unique_settings(prefix, url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
    app = Pigeon(service=f"{prefix}-orders", settings=settings)
    broker.apps.append(app)
    await app.declare()
    channel = await broker.connection.channel()
    tap = await channel.declare_queue(f"{prefix}.tap")
    broker.queues.add(tap.name)
    await tap.bind(settings.exchange, "#")
    for i in range(30):
        if i % 10 == 5:
            await proxy.cut()
        await app.dispatch_async(OrderPlaced(order_id=f"o-{i}"))
    assert await broker.count(tap.name) == 30
    await app.close()


async def test_a_consumer_cancelled_by_the_broker_is_subscribed_again(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("notification")
    seen: list[str] = []

    @app.listener(OrderPlaced)
    async def send(event: OrderPlaced) -> None:
        seen.append(event.order_id)

    worker = await run_worker(app)
    before = worker.connections
    channel = await broker.connection.channel()
    await channel.queue_delete(send.queue)  # RabbitMQ sends basic.cancel to the consumer
    await eventually(lambda: worker.connections > before, message="worker re-subscribed")
    await eventually(worker.ready.is_set)
    await app.dispatch_async(OrderPlaced(order_id="after-cancel"))
    await eventually(lambda: seen == ["after-cancel"])


async def test_a_channel_asked_of_a_connection_that_just_closed_is_a_retryable_error() -> None:
    """The instant after the broker shut the connection: aiormq knows, aio-pika not yet.
    (That instant cannot be made to happen on cue with a real broker, so the connection
    is simulated.)"""
    connector = Connector(AMQP_URL, name="test")
    closing = SimpleNamespace(is_closed=False)

    async def channel(**_: object) -> None:
        closing.is_closed = True
        raise RuntimeError('<Connection: "amqp://guest:******@127.0.0.1:5672/"> closed')

    closing.channel = channel
    connector._connection = cast(AbstractConnection, closing)
    with pytest.raises(ConnectionError, match="closed"):
        await connector.channel()
    assert not connector.is_open, "forgotten: the next call connects afresh"
    assert issubclass(ConnectionError, RETRYABLE), "so dispatch retries it with backoff"
    real = await connector.channel()
    assert not real.is_closed
    await connector.close()
