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
from tests.conftest import AppFactory, RunWorker, eventually
from tests.outboxkit import Shipped, settle_at_once


@pytest.fixture
async def box(kind: str, tmp_path: Path, prefix: str) -> AsyncIterator[Outbox]:
    """An outbox and inbox in ``stock.db`` (tables made), through a sync or an async engine
    (``kind``) whose busy timeout is 0.1 s. Request it before ``run_worker``: its engine is
    disposed of after the worker stopped."""
    path = tmp_path / "stock.db"
    table, inbox = f"ob_{prefix}", f"ib_{prefix}"
    setup = create_engine(f"sqlite:///{path}")
    Outbox(setup, table=table, inbox_table=inbox).create_tables()
    setup.dispose()
    quick = {"timeout": 0.1}
    engine: Engine | AsyncEngine
    if kind == "sync":
        engine = create_engine(f"sqlite:///{path}", connect_args=quick)
    else:
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args=quick)
    yield Outbox(engine, table=table, inbox_table=inbox)
    if isinstance(engine, AsyncEngine):
        await engine.dispose()
    else:
        engine.dispose()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_message_that_finds_sqlite_locked_by_another_process_is_retried_not_dead_lettered(
    kind: str, box: Outbox, tmp_path: Path, make_app: AppFactory, run_worker: RunWorker
) -> None:
    """Another process holds the write lock past the busy timeout (0.1 s here), so the
    inbox insert fails with "database is locked". With one attempt, the message was
    dead-lettered as handler-error; it is tried again later, and handled once the
    lock is free."""
    app = make_app("stock")
    box.app = app
    handled: list[str] = []
    if kind == "sync":

        @app.listener(Shipped, outbox=box, retry=Retry(attempts=1))
        def reserve(event: Shipped, ctx: Context) -> None:
            handled.append(event.order_id)

    else:

        @app.listener(Shipped, outbox=box, retry=Retry(attempts=1))
        async def reserve_async(event: Shipped, ctx: Context) -> None:
            handled.append(event.order_id)

    worker = await run_worker(app)
    holder = sqlite3.connect(tmp_path / "stock.db", isolation_level=None)
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
    kind: str, box: Outbox, make_app: AppFactory, run_worker: RunWorker
) -> None:
    """Three concurrent handlers, each holding the write lock longer than the busy
    timeout (0.1 s here): the second and third failed with "database is locked"
    and were dead-lettered; they wait for their turn instead."""
    app = make_app("stock")
    box.app = app
    if kind == "sync":

        @app.listener(Shipped, outbox=box, retry=Retry(attempts=1))
        def reserve(event: Shipped, ctx: Context) -> None:
            ctx.dispatch_sync("outbox.test.reserved", {"order_id": event.order_id})
            time.sleep(0.3)

    else:

        @app.listener(Shipped, outbox=box, retry=Retry(attempts=1))
        async def reserve_async(event: Shipped, ctx: Context) -> None:
            await ctx.dispatch("outbox.test.reserved", {"order_id": event.order_id})
            await asyncio.sleep(0.3)

    worker = await settle_at_once(app, run_worker, 3, timeout=30)

    assert worker.counts["dead_lettered"] == 0, worker.counts
