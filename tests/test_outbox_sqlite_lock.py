"""Inbox transactions on SQLite and its single write lock.

An inbox transaction holds SQLite's write lock while its handler runs. Waiting
for that lock is contention, never a reason to fail a message: the handlers
of one process take turns (see the attack test of ten 1 s handlers), and a
lock held past the busy timeout by another process is a retry that spends
no attempt.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from pigeon import Context, Retry
from pigeon.outbox import Outbox
from tests.conftest import AppFactory, Broker, RunWorker, eventually
from tests.outboxkit import Shipped


@pytest.fixture
async def engines() -> AsyncIterator[list[Engine | AsyncEngine]]:
    """Engines disposed of after the worker stopped (request it before ``run_worker``)."""
    made: list[Engine | AsyncEngine] = []
    yield made
    for engine in made:
        if isinstance(engine, AsyncEngine):
            await engine.dispose()
        else:
            engine.dispose()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_message_that_finds_sqlite_locked_by_another_process_is_retried_not_dead_lettered(
    kind: str,
    tmp_path: Path,
    prefix: str,
    engines: list[Engine | AsyncEngine],
    make_app: AppFactory,
    run_worker: RunWorker,
    broker: Broker,
) -> None:
    """Another process holds the write lock past the busy timeout (0.1 s here), so the
    inbox insert fails with "database is locked". With one attempt, the message was
    dead-lettered as handler-error; it is tried again later, and handled once the
    lock is free."""
    path = tmp_path / "stock.db"
    table, inbox = f"ob_{prefix}", f"ib_{prefix}"
    setup = create_engine(f"sqlite:///{path}")
    Outbox(setup, table=table, inbox_table=inbox).create_tables()
    setup.dispose()
    quick = {"timeout": 0.1}
    app = make_app("stock")
    handled: list[str] = []
    if kind == "sync":
        sync_engine = create_engine(f"sqlite:///{path}", connect_args=quick)
        engines.append(sync_engine)
        box = Outbox(sync_engine, app=app, table=table, inbox_table=inbox)

        @app.listener(Shipped, outbox=box, retry=Retry(attempts=1))
        def reserve(event: Shipped, ctx: Context) -> None:
            handled.append(event.order_id)

    else:
        async_engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args=quick)
        engines.append(async_engine)
        box = Outbox(async_engine, app=app, table=table, inbox_table=inbox)

        @app.listener(Shipped, outbox=box, retry=Retry(attempts=1))
        async def reserve_async(event: Shipped, ctx: Context) -> None:
            handled.append(event.order_id)

    worker = await run_worker(app)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, as another process would hold it
        await app.dispatch_async(Shipped(order_id="o-1"))
        await eventually(lambda: worker.counts["retried"] >= 1, timeout=30, message="a retry")
    finally:
        holder.close()  # rolls back: the lock is free
    await eventually(lambda: worker.counts["acked"] == 1, timeout=30, message="handled")

    assert worker.counts["dead_lettered"] == 0, worker.counts
    assert handled == ["o-1"]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_sqlite_inbox_handlers_of_one_process_take_turns_for_the_write_lock(
    kind: str,
    tmp_path: Path,
    prefix: str,
    engines: list[Engine | AsyncEngine],
    make_app: AppFactory,
    run_worker: RunWorker,
    broker: Broker,
) -> None:
    """Three concurrent handlers, each holding the write lock longer than the busy
    timeout (0.1 s here): the second and third failed with "database is locked"
    and were dead-lettered; they wait for their turn instead."""
    path = tmp_path / "stock.db"
    quick = {"timeout": 0.1}
    app = make_app("stock")
    table, inbox = f"ob_{prefix}", f"ib_{prefix}"
    if kind == "sync":
        sync_engine = create_engine(f"sqlite:///{path}", connect_args=quick)
        engines.append(sync_engine)
        box = Outbox(sync_engine, app=app, table=table, inbox_table=inbox)
        box.create_tables()

        @app.listener(Shipped, outbox=box, retry=Retry(attempts=1))
        def reserve(event: Shipped, ctx: Context) -> None:
            ctx.dispatch_sync("outbox.test.reserved", {"order_id": event.order_id})
            time.sleep(0.3)

    else:
        async_engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args=quick)
        engines.append(async_engine)
        box = Outbox(async_engine, app=app, table=table, inbox_table=inbox)
        await box.create_tables_async()

        @app.listener(Shipped, outbox=box, retry=Retry(attempts=1))
        async def reserve_async(event: Shipped, ctx: Context) -> None:
            await ctx.dispatch("outbox.test.reserved", {"order_id": event.order_id})
            await asyncio.sleep(0.3)

    worker = await run_worker(app, concurrency=3)
    await app.dispatch_many([Shipped(order_id=f"o-{i}") for i in range(3)])
    await eventually(
        lambda: worker.counts["acked"] + worker.counts["dead_lettered"] == 3,
        timeout=30,
        message="all settled",
    )

    assert worker.counts["dead_lettered"] == 0, worker.counts
