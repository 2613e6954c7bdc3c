"""What the outbox and inbox tests share: the event, the queues, the relay, the fixtures.

A test file takes the fixtures it uses by importing them (and ``pg_name``, which
``db_url`` asks for) and naming them in its ``__all__``:

- ``db_url``: an SQLite file or a table space in this session's PostgreSQL database;
- ``engine``: a sync engine on it;
- ``box``: an outbox and inbox ``ob_<prefix>``/``ib_<prefix>`` and an effects table
  ``fx_<prefix>`` on ``engine``, all dropped after;
- ``async_box``: ``box``'s tables through an AsyncEngine;
- ``kit``: ``box`` with the broker, the apps and the workers of one test (a ``Kit``).

Request ``box`` and ``async_box`` before ``run_worker`` (``kit`` asks for it after
``box``): a worker's relay stops before the tables and engines go.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from sqlalchemy import Engine, Table, create_engine, func, select
from sqlalchemy.ext.asyncio import create_async_engine

from pigeon import Event, Pigeon
from pigeon import topology as topo
from pigeon.outbox import Outbox, Relay, status
from pigeon.outbox.tables import async_url
from pigeon.settings import Settings
from pigeon.worker import Worker
from tests.conftest import AppFactory, Broker, RunWorker, eventually
from tests.outbox_support import effects_table, pg_url


class Shipped(Event, name="outbox.test.shipped"):
    order_id: str
    seq: int = 0


async def bind_queue(
    broker: Broker, settings: Settings, name: str, pattern: str = "#"
) -> aio_pika.abc.AbstractQueue:
    """A queue of this test's own, bound to ``pattern`` on its exchange."""
    await topo.declare(broker.connection, topo.core_topology(settings))
    broker.track(settings)
    channel = await broker.connection.channel()
    exchange = await channel.get_exchange(settings.exchange)
    queue = await channel.declare_queue(name, auto_delete=False)
    await queue.bind(exchange, pattern)
    broker.queues.add(name)
    return queue


async def drain_queue(queue: aio_pika.abc.AbstractQueue, count: int) -> list[Any]:
    """Exactly the ``count`` messages that must be on ``queue`` by now."""
    got: list[Any] = []
    while len(got) < count:
        message = await queue.get(fail=False, no_ack=True)
        if message is None:
            raise AssertionError(f"{len(got)}/{count} messages on {queue.name}")
        got.append(message)
    assert await queue.get(fail=False, no_ack=True) is None, "more messages than rows"
    return got


@contextlib.asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[asyncio.Task[int]]:
    task = asyncio.create_task(relay.run())
    try:
        yield task
    finally:
        relay.stop("test finished")
        await asyncio.wait_for(task, 30)
        await relay.outbox.close()


async def wait_published(box: Outbox, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (await status(box))[0]:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{(await status(box))[0]} rows still pending after {timeout}s")
        await asyncio.sleep(0.05)


async def relay_all(
    box: Outbox, queue: aio_pika.abc.AbstractQueue, count: int, app: Pigeon | None = None
) -> list[Any]:
    """Run a relay of ``box`` until nothing is pending; then exactly the ``count`` messages
    that must be on ``queue``."""
    async with running(Relay(box, app=app)):
        await wait_published(box)
    return await drain_queue(queue, count)


async def settle_at_once(app: Pigeon, run_worker: RunWorker, count: int, timeout: float) -> Worker:
    """Start a worker of ``app`` that runs ``count`` handlers at once, send it ``count``
    events, and wait until each is settled (acked or dead-lettered)."""
    worker = await run_worker(app, concurrency=count)
    await app.dispatch_many([Shipped(order_id=f"o-{i}") for i in range(count)])
    await eventually(
        lambda: worker.counts["acked"] + worker.counts["dead_lettered"] == count,
        timeout=timeout,
        message="all settled",
    )
    return worker


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, pg_name: str) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    return pg_url(pg_name)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
async def box(engine: Engine, prefix: str) -> AsyncIterator[Outbox]:
    """A fresh outbox and inbox, and an effects table ``fx_<prefix>``; all dropped after."""
    box = Outbox(engine, table=f"ob_{prefix}", inbox_table=f"ib_{prefix}")
    box.create_tables()
    metadata, _ = effects_table(prefix)
    metadata.create_all(engine)
    yield box
    await box.close()
    metadata.drop_all(engine)
    box.metadata.drop_all(engine)


@pytest.fixture
async def async_box(engine: Engine, box: Outbox) -> AsyncIterator[Outbox]:
    """``box``'s tables through an AsyncEngine."""
    aengine = create_async_engine(async_url(engine.url))
    yield Outbox(aengine, table=box.table.name, inbox_table=box.inbox.name)
    await aengine.dispose()


@dataclass
class Kit:
    """One test's outbox ``box`` on ``engine``, its effects table, and the broker's side."""

    engine: Engine
    box: Outbox
    effects: Table
    prefix: str
    broker: Broker
    settings: Settings
    make_app: AppFactory
    run_worker: RunWorker

    def app(self, service: str, box: Outbox | None = None) -> Pigeon:
        """A new app for ``service``, made the app of ``box`` (``self.box`` unless given)."""
        app = self.make_app(service)
        (self.box if box is None else box).app = app
        return app

    async def queue(self, name: str = "seen", pattern: str = "#") -> aio_pika.abc.AbstractQueue:
        """A queue ``<prefix>.<name>`` of this test's own, bound to ``pattern``."""
        return await bind_queue(self.broker, self.settings, f"{self.prefix}.{name}", pattern)

    async def dead_letter(self, timeout: float = 20) -> aio_pika.abc.AbstractIncomingMessage:
        """The next message on the dead-letter queue (fails if none comes in ``timeout``)."""
        return await self.broker.get(self.settings.dead_letter_queue, timeout)

    def column(self, column: Any) -> list[Any]:
        """The values of one column, as committed now."""
        with self.engine.connect() as conn:
            return list(conn.execute(select(column)).scalars())

    def count(self, table: Table) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


@pytest.fixture
def kit(
    engine: Engine,
    box: Outbox,
    prefix: str,
    broker: Broker,
    settings: Settings,
    make_app: AppFactory,
    run_worker: RunWorker,
) -> Kit:
    _, effects = effects_table(prefix)
    return Kit(engine, box, effects, prefix, broker, settings, make_app, run_worker)
