"""The transactional outbox and its relay, on real PostgreSQL and SQLite, with real RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from pigeon.outbox import Outbox, Relay
from pigeon.settings import Settings
from tests.conftest import AppFactory, Broker
from tests.outbox_support import pg_name, pg_url
from tests.outboxkit import (
    Shipped,
    bind_queue,
    db_url,
    drain_queue,
    engine,
    relay_all,
    running,
    wait_published,
)

__all__ = ["db_url", "engine", "pg_name"]


@pytest.fixture
def outbox(engine: Engine, prefix: str) -> Iterator[Outbox]:
    box = Outbox(engine, table=f"ob_{prefix}", inbox_table=f"ib_{prefix}")
    box.create_tables()
    yield box
    box.metadata.drop_all(engine)


async def test_a_rolled_back_transaction_never_publishes(
    outbox: Outbox, engine: Engine, make_app: AppFactory, broker: Broker, settings: Settings
) -> None:
    app = make_app("shop")
    outbox.app = app
    queue = await bind_queue(broker, settings, f"{broker.prefix}.seen")
    with contextlib.suppress(RuntimeError), Session(engine) as s, s.begin():
        ghost = outbox.dispatch(s, Shipped(order_id="ghost"))
        raise RuntimeError("the order could not be stored")
    with Session(engine) as s, s.begin():
        real = outbox.dispatch(s, Shipped(order_id="real"), correlation_id="c-1")

    (message,) = await relay_all(outbox, queue, 1, app=app)

    assert message.message_id == real != ghost
    assert message.correlation_id == "c-1"
    assert message.type == "outbox.test.shipped"
    assert message.app_id == app.service
    assert json.loads(message.body) == {"order_id": "real", "seq": 0}
    with engine.connect() as conn:
        ids = set(conn.execute(select(outbox.table.c.message_id)).scalars())
    assert ids == {real}


async def test_two_relays_never_publish_a_row_twice_and_keep_each_keys_order(
    outbox: Outbox, engine: Engine, make_app: AppFactory, broker: Broker, settings: Settings
) -> None:
    outbox.app = make_app("shop")
    queue = await bind_queue(broker, settings, f"{broker.prefix}.seen")
    rng = random.Random(7)
    seq: dict[str, int] = defaultdict(int)
    written = 0
    for _ in range(40):
        with Session(engine) as s, s.begin():
            for _ in range(10):
                key = f"order-{rng.randrange(12)}"
                seq[key] += 1
                outbox.dispatch(s, Shipped(order_id=key, seq=seq[key]), key=key)
                written += 1
    first = Relay(outbox, app=make_app("relay-a"), batch_size=16)
    second = Relay(
        Outbox(outbox.engine, table=outbox.table.name, inbox_table=outbox.inbox.name),
        app=make_app("relay-b"),
    )
    second.batch_size = 16

    async with running(first), running(second):
        await wait_published(outbox)
    messages = await drain_queue(queue, written)

    ids = [m.message_id for m in messages]
    assert len(set(ids)) == written
    last: dict[str, int] = defaultdict(int)
    for m in messages:
        payload = json.loads(m.body)
        assert payload["seq"] == last[payload["order_id"]] + 1, payload
        last[payload["order_id"]] = payload["seq"]
    assert first.published > 0
    assert second.published > 0
    assert first.published + second.published == written


async def test_the_async_form_stores_in_the_async_sessions_transaction(
    db_url: str, prefix: str, make_app: AppFactory, broker: Broker, settings: Settings
) -> None:
    from pigeon.outbox.tables import async_url

    aengine = create_async_engine(async_url(db_url))
    box = Outbox(aengine, app=make_app("shop"), table=f"ob_{prefix}", inbox_table=f"ib_{prefix}")
    await box.create_tables_async()
    queue = await bind_queue(broker, settings, f"{broker.prefix}.seen")
    try:
        async with AsyncSession(aengine) as s, s.begin():
            first = await box.dispatch_async(s, Shipped(order_id="o-1", seq=1), message_id="m-1")
            await box.dispatch_async(s, "outbox.test.untyped", {"order_id": "o-1"})
        messages = await relay_all(box, queue, 2)
    finally:
        async with aengine.begin() as conn:
            await conn.run_sync(box.metadata.drop_all)
        await aengine.dispose()
    assert first == "m-1"
    assert messages[0].message_id == "m-1"
    assert [m.routing_key for m in messages] == ["outbox.test.shipped", "outbox.test.untyped"]


async def test_a_postgres_relay_waits_on_notify_without_polling(
    pg_name: str, prefix: str, make_app: AppFactory, broker: Broker, settings: Settings
) -> None:
    engine = create_engine(pg_url(pg_name))
    box = Outbox(engine, app=make_app("shop"), table=f"ob_{prefix}", inbox_table=f"ib_{prefix}")
    box.create_tables()
    queue = await bind_queue(broker, settings, f"{broker.prefix}.seen")
    statements: list[str] = []
    relay = Relay(box, poll_interval=600)
    event.listen(
        box.relay_engine().sync_engine,
        "before_cursor_execute",
        lambda *args: statements.append(args[2]),
    )
    try:
        async with running(relay):
            await asyncio.wait_for(relay.ready.wait(), 20)
            idle_from = len(statements)
            await asyncio.sleep(1.5)  # an idle relay: a busy poll would run dozens here
            idle = statements[idle_from:]
            with Session(engine) as s, s.begin():
                outbox_id = box.dispatch(s, Shipped(order_id="wake-up"))
            # the poll is 10 minutes away: only the NOTIFY can bring it this fast
            message = await _get(queue, timeout=20)
    finally:
        box.metadata.drop_all(engine)
        engine.dispose()
    assert len(idle) <= 2, idle
    assert message.message_id == outbox_id


async def _get(queue: aio_pika.abc.AbstractQueue, timeout: float) -> Any:
    found: list[Any] = []

    async def poll() -> bool:
        message = await queue.get(fail=False, no_ack=True)
        if message is not None:
            found.append(message)
        return bool(found)

    deadline = asyncio.get_running_loop().time() + timeout
    while not await poll():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"nothing on {queue.name} within {timeout}s")
        await asyncio.sleep(0.05)
    return found[0]
