"""Listeners with ``outbox=``: effect, inbox mark and outgoing events in one transaction."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aio_pika
import pytest
from sqlalchemy import Column, Engine, MetaData, String, Table, create_engine, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from pigeon import Context, Retry
from pigeon.outbox import Outbox
from pigeon.outbox.tables import async_url
from pigeon.settings import Settings
from tests.conftest import AppFactory, Broker, RunWorker, eventually
from tests.outbox_support import pg_name, pg_url
from tests.outboxkit import Shipped, bind_queue, drain_queue, wait_published

__all__ = ["pg_name"]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, pg_name: str) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'stock.db'}"
    return pg_url(pg_name)


def effects_table(prefix: str) -> tuple[MetaData, Table]:
    metadata = MetaData()
    table = Table(
        f"fx_{prefix}",
        metadata,
        Column("message_id", String(255), nullable=False),
        Column("order_id", String(255), nullable=False),
    )
    return metadata, table


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    yield engine
    engine.dispose()


Cleanup = list[Callable[[], Awaitable[None]]]


@pytest.fixture
async def cleanup() -> AsyncIterator[Cleanup]:
    """Undo steps run after the worker stopped (request it before ``run_worker``): a
    relay still running must not see its tables dropped or its engine disposed."""
    steps: Cleanup = []
    yield steps
    for step in reversed(steps):
        await step()


async def publish(broker: Broker, settings: Settings, event: Shipped, message_id: str) -> None:
    channel = await broker.connection.channel()
    exchange = await channel.get_exchange(settings.exchange)
    await exchange.publish(
        aio_pika.Message(
            event.to_json(),
            message_id=message_id,
            content_type="application/json",
            type=type(event).event_name(),
        ),
        routing_key=type(event).event_name(),
    )
    await channel.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_an_inbox_listener_takes_effect_once_and_its_events_commit_with_it(
    kind: str,
    db_url: str,
    engine: Engine,
    prefix: str,
    make_app: AppFactory,
    cleanup: Cleanup,
    run_worker: RunWorker,
    broker: Broker,
    settings: Settings,
) -> None:
    metadata, effects = effects_table(prefix)
    metadata.create_all(engine)
    aengine = create_async_engine(async_url(db_url)) if kind == "async" else None
    box = Outbox(aengine or engine, table=f"ob_{prefix}", inbox_table=f"ib_{prefix}")
    box.create_tables() if aengine is None else await box.create_tables_async()

    async def undo() -> None:
        metadata.drop_all(engine)
        box.metadata.drop_all(engine)
        if aengine is not None:
            await aengine.dispose()

    cleanup.append(undo)
    app = make_app("stock")
    tries: Counter[str] = Counter()

    def effect(ctx: Context, order_id: str) -> None:
        tries[order_id] += 1
        if order_id == "flaky" and tries[order_id] == 1:
            raise RuntimeError("fails after its effect and its event")

    if kind == "sync":

        @app.listener(Shipped, outbox=box, retry=Retry(attempts=3, immediate=1, delays=[0.1]))
        def reserve(event: Shipped, ctx: Context) -> None:
            ctx.session.execute(
                insert(effects).values(message_id=ctx.message_id, order_id=event.order_id)
            )
            ctx.dispatch_sync("outbox.test.reserved", {"order_id": event.order_id})
            effect(ctx, event.order_id)

    else:

        @app.listener(Shipped, outbox=box, retry=Retry(attempts=3, immediate=1, delays=[0.1]))
        async def reserve(event: Shipped, ctx: Context) -> None:
            assert isinstance(ctx.session, AsyncSession)
            await ctx.session.execute(
                insert(effects).values(message_id=ctx.message_id, order_id=event.order_id)
            )
            await ctx.dispatch("outbox.test.reserved", {"order_id": event.order_id})
            effect(ctx, event.order_id)

    worker = await run_worker(app)
    reserved = await bind_queue(broker, settings, f"{prefix}.reserved", "outbox.test.reserved")
    for order_id, message_id in (("o-1", "m-1"), ("o-1", "m-1"), ("flaky", "m-2")):
        await publish(broker, settings, Shipped(order_id=order_id), message_id)
    await eventually(
        lambda: worker.counts["acked"] == 2 and worker.counts["duplicate"] == 1,
        message="two handled, one duplicate",
    )
    await wait_published(box)
    messages = await drain_queue(reserved, 2)
    with engine.connect() as conn:
        rows = sorted(conn.execute(select(effects.c.message_id, effects.c.order_id)).all())

    assert rows == [("m-1", "o-1"), ("m-2", "flaky")]
    assert tries == {"o-1": 1, "flaky": 2}
    assert sorted(json.loads(m.body)["order_id"] for m in messages) == ["flaky", "o-1"]
    assert {m.headers["x-pigeon-causation-id"] for m in messages} == {"m-1", "m-2"}
    assert {m.app_id for m in messages} == {app.service}


def test_a_sync_handler_needs_a_sync_engine(tmp_path: Path, make_app: AppFactory) -> None:
    from pigeon import ConfigurationError

    box = Outbox(create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"))
    app = make_app("stock")
    with pytest.raises(ConfigurationError, match="sync Engine"):

        @app.listener(Shipped, outbox=box)
        def reserve(event: Shipped) -> None: ...


async def test_the_idle_worker_relays_without_a_second_process(
    engine: Engine,
    prefix: str,
    make_app: AppFactory,
    cleanup: Cleanup,
    run_worker: RunWorker,
    broker: Broker,
    settings: Settings,
) -> None:
    box = Outbox(engine, table=f"ob_{prefix}", inbox_table=f"ib_{prefix}")
    box.create_tables()

    async def undo() -> None:
        box.metadata.drop_all(engine)

    cleanup.append(undo)
    app = make_app("stock")
    box.app = app

    @app.listener("outbox.test.nothing", outbox=box)
    def ignore(payload: dict[str, str]) -> None: ...

    await run_worker(app)
    seen = await bind_queue(broker, settings, f"{prefix}.seen")
    from sqlalchemy.orm import Session

    with Session(engine) as s, s.begin():
        message_id = box.dispatch(s, Shipped(order_id="o-9"))
    await wait_published(box)
    (message,) = await drain_queue(seen, 1)
    assert message.message_id == message_id
