"""Outbox throughput on PostgreSQL: ``outbox.dispatch_async`` + relay vs plain dispatch.

Every figure keeps 256 events in flight. Plain: ``app.dispatch_async``
(publish, wait for the confirm). Outbox: each event is its own transaction
(an ``AsyncSession`` on asyncpg, insert + commit) and one in-process relay
publishes the committed rows with confirms; the figure is events per second
from the first transaction to the last confirm. Two more rows say where the
time goes: the relay alone (a pre-filled table to the last confirm), and the
same 256 transactions in flight inserting into a plain table, no outbox:
the commit rate of the transactions themselves, which bounds any
one-event-per-transaction outbox. Rounds alternate so drift on a shared machine hits all of them. The
database is a new, uniquely named one, dropped at the end.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from bench.common import (
    URL,
    Rate,
    bench_settings,
    delete,
    in_flight,
    new_prefix,
    quiet_logs,
    quorum_sink,
    table,
    timed,
)
from bench.dispatch import event
from pigeon import Pigeon
from pigeon.outbox import Outbox, Relay

PG = "postgres@127.0.0.1:5432"


async def _outbox_round(box: Outbox, relay: Relay, count: int) -> None:
    engine = box.engine
    assert not isinstance(engine, str)
    target = relay.published + count

    async def one(i: int) -> None:
        async with AsyncSession(engine) as session, session.begin():  # type: ignore[arg-type]
            await box.dispatch_async(session, event(i))

    await in_flight(count, 256, one)
    while relay.published < target:  # noqa: ASYNC110 (the relay has no event per row)
        await asyncio.sleep(0.005)


async def _relay_round(box: Outbox, relay: Relay, count: int) -> float:
    """Fill the table with ``count`` rows while the relay is paused; its rate to drain them."""
    engine = box.engine
    assert not isinstance(engine, str)
    async with AsyncSession(engine) as session, session.begin():  # type: ignore[arg-type]
        for i in range(count):
            await box.dispatch_async(session, event(i), key=str(i))
    started = time.perf_counter()
    while await relay._pump():
        pass
    return count / (time.perf_counter() - started)


async def _bare_round(engine: AsyncEngine, count: int) -> None:
    """The same transactions without the outbox: one plain row each, through SQLAlchemy."""
    statement = text("INSERT INTO bare (id) VALUES (:id)")

    async def one(i: int) -> None:
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(statement, {"id": str(uuid.uuid4())})

    await in_flight(count, 256, one)


async def main(count: int = 8000, rounds: int = 3) -> list[tuple[str, str, str, str]]:
    prefix = new_prefix()
    settings = bench_settings(prefix)
    app = Pigeon(service="bench", settings=settings)
    await app.declare()
    connection = await aio_pika.connect(URL)
    queue = f"{prefix}.sink"
    await quorum_sink(connection, settings.exchange, queue, "#")
    database = f"bench_outbox_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"postgresql://{PG}/postgres")
    await admin.execute(f'CREATE DATABASE "{database}"')
    engine = create_async_engine(
        f"postgresql+asyncpg://{PG}/{database}", pool_size=32, max_overflow=0
    )
    box = Outbox(engine, app=app, retention=0)
    await box.create_tables_async()
    relay = Relay(box, app=app)
    relaying = asyncio.ensure_future(relay.run())
    rates = {name: Rate(name, []) for name in ("outbox", "plain", "relay", "bare")}
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE bare (id text PRIMARY KEY)"))

    async def plain(i: int) -> None:
        await app.dispatch_async(event(i))

    try:
        await in_flight(500, 256, plain)  # warm-up: connections, caches
        await _outbox_round(box, relay, 500)
        for _ in range(rounds):
            rates["plain"].per_second.append(
                await timed(count, lambda: in_flight(count, 256, plain))
            )
            rates["outbox"].per_second.append(
                await timed(count, lambda: _outbox_round(box, relay, count))
            )
            rates["bare"].per_second.append(await timed(count, lambda: _bare_round(engine, count)))
            await (await (await connection.channel()).get_queue(queue, ensure=False)).purge()
        relay.stop("bench paused")
        await relaying
        paused = Relay(box, app=app)
        for _ in range(rounds):
            rates["relay"].per_second.append(await _relay_round(box, paused, count))
    finally:
        relay.stop("bench finished")
        await relaying
        await engine.dispose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
        await app.close()
        await delete(
            connection,
            [queue, settings.unrouted_queue, settings.dead_letter_queue],
            [settings.exchange, settings.unrouted_exchange, settings.dead_letter_exchange],
        )
        await connection.close()
    plain_rate = rates["plain"].median
    rows = []
    for label, name, peer in (
        ("outbox.dispatch + relay vs dispatch, 256 in flight", "outbox", plain_rate),
        ("outbox relay alone vs dispatch, 256 in flight", "relay", plain_rate),
        (
            "outbox.dispatch + relay vs the same transactions without it",
            "outbox",
            rates["bare"].median,
        ),
    ):
        p = rates[name].median
        rows.append((label, f"{p:,.0f}/s", f"{peer:,.0f}/s", f"{p / peer:.2f}x"))
    return rows


if __name__ == "__main__":
    quiet_logs()
    started = time.monotonic()
    print(table(asyncio.run(main())))
    print(f"({time.monotonic() - started:.0f} s)")
