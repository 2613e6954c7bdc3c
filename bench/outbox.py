"""Outbox throughput on PostgreSQL: ``outbox.dispatch_async`` + relay vs plain dispatch.

Every figure keeps 256 events in flight. Plain: ``app.dispatch_async``
(publish, wait for the confirm). Outbox: each event is its own transaction
(an ``AsyncSession`` on asyncpg, insert + commit), as a service stores one
event with each change, and one in-process relay publishes the committed
rows with confirms; the figure is events per second from the first
transaction to the last confirm. More rows say where the time goes: the
relay alone (a pre-filled table to the last confirm); the same 256
transactions in flight inserting one plain row each, no outbox (the rate of
the transactions themselves, which bounds any one-event-per-transaction
outbox); the outbox with 8 events per transaction (32 transactions, 256
events in flight), where a transaction's cost is shared; and this process's CPU time per event (all threads), which moves
less with the neighbours than the rates do. Each round measures every
figure once, in turn, so drift on a shared machine hits them all; the
medians are reported, with the load average. The database is a new,
uniquely named one, dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable

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
PER_TRANSACTION = 8
"""Events per transaction in the batched figure (a 256-event window is 32 transactions)."""


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


async def _outbox_batch_round(box: Outbox, relay: Relay, count: int) -> None:
    """Like :func:`_outbox_round`, with ``PER_TRANSACTION`` events in each transaction
    (still 256 events in flight): what is left when a transaction's cost is shared."""
    engine = box.engine
    assert not isinstance(engine, str)
    target = relay.published + count

    async def one(i: int) -> None:
        async with AsyncSession(engine) as session, session.begin():  # type: ignore[arg-type]
            for j in range(PER_TRANSACTION):
                await box.dispatch_async(session, event(i * PER_TRANSACTION + j))

    await in_flight(count // PER_TRANSACTION, 256 // PER_TRANSACTION, one)
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


async def _cpu_timed(count: int, run: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """Events per second and this process's CPU microseconds per event (all its threads)."""
    cpu = time.process_time()
    rate = await timed(count, run)
    return rate, (time.process_time() - cpu) / count * 1e6


async def _database() -> tuple[asyncpg.Connection, str, AsyncEngine]:
    database = f"bench_outbox_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"postgresql://{PG}/postgres")
    await admin.execute(f'CREATE DATABASE "{database}"')
    engine = create_async_engine(
        f"postgresql+asyncpg://{PG}/{database}", pool_size=32, max_overflow=0
    )
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE bare (id text PRIMARY KEY)"))
    return admin, database, engine


async def _rounds(
    app: Pigeon, box: Outbox, count: int, rounds: int, purge: Callable[[], Awaitable[object]]
) -> dict[str, Rate]:
    """Each round measures every figure once, in turn, so drift hits them all alike."""
    engine = box.engine
    assert isinstance(engine, AsyncEngine)
    rates = {name: Rate(name, []) for name in ("outbox", "batched", "plain", "relay", "bare")}
    cpu = {name: Rate(name, []) for name in ("outbox", "batched", "plain", "bare")}

    async def plain(i: int) -> None:
        await app.dispatch_async(event(i))

    await in_flight(500, 256, plain)  # warm-up: connections, caches
    for _ in range(rounds):
        relay = Relay(box, app=app)
        relaying = asyncio.ensure_future(relay.run())
        if not rates["outbox"].per_second:
            await _outbox_round(box, relay, 500)
        figures = (
            ("plain", lambda: in_flight(count, 256, plain)),
            ("outbox", lambda: _outbox_round(box, relay, count)),  # noqa: B023
            ("batched", lambda: _outbox_batch_round(box, relay, count)),  # noqa: B023
            ("bare", lambda: _bare_round(engine, count)),
        )
        for name, run in figures:
            rate, micros = await _cpu_timed(count, run)
            rates[name].per_second.append(rate)
            cpu[name].per_second.append(micros)
        relay.stop("bench paused")
        await relaying
        rates["relay"].per_second.append(await _relay_round(box, Relay(box, app=app), count))
        await purge()
    rates.update({f"cpu {name}": rate for name, rate in cpu.items()})
    return rates


async def main(count: int = 6000, rounds: int = 3) -> list[tuple[str, str, str, str]]:
    prefix = new_prefix()
    settings = bench_settings(prefix)
    app = Pigeon(service="bench", settings=settings)
    await app.declare()
    connection = await aio_pika.connect(URL)
    queue = f"{prefix}.sink"
    await quorum_sink(connection, settings.exchange, queue, "#")
    admin, database, engine = await _database()
    box = Outbox(engine, app=app, retention=0)
    await box.create_tables_async()

    async def purge() -> None:
        await (await (await connection.channel()).get_queue(queue, ensure=False)).purge()

    load = [os.getloadavg()[0]]
    try:
        rates = await _rounds(app, box, count, rounds, purge)
    finally:
        load.append(os.getloadavg()[0])
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
    return _rows(rates, load)


def _rows(rates: dict[str, Rate], load: list[float]) -> list[tuple[str, str, str, str]]:
    median = {name: rate.median for name, rate in rates.items()}
    rows = []
    for label, name, peer in (
        ("outbox.dispatch + relay vs dispatch, 256 in flight", "outbox", "plain"),
        (
            f"outbox.dispatch + relay, {PER_TRANSACTION} events per transaction, vs dispatch",
            "batched",
            "plain",
        ),
        ("outbox relay alone vs dispatch, 256 in flight", "relay", "plain"),
        ("outbox.dispatch + relay vs the same transactions without it", "outbox", "bare"),
        ("the same transactions without the outbox vs dispatch", "bare", "plain"),
    ):
        p, q = median[name], median[peer]
        rows.append((label, f"{p:,.0f}/s", f"{q:,.0f}/s", f"{p / q:.2f}x"))
    for label, name in (
        ("outbox.dispatch + relay, CPU per event vs dispatch", "cpu outbox"),
        (
            f"outbox.dispatch + relay, {PER_TRANSACTION} events per transaction, CPU per event",
            "cpu batched",
        ),
        ("the same transactions without the outbox, CPU per event vs dispatch", "cpu bare"),
    ):
        p, q = median[name], median["cpu plain"]
        rows.append((label, f"{p:,.0f} µs", f"{q:,.0f} µs", f"{p / q:.2f}x"))
    rows.append(("load average (1 min) at start and end", f"{load[0]:.1f}", f"{load[-1]:.1f}", ""))
    return rows


if __name__ == "__main__":
    quiet_logs()
    started = time.monotonic()
    print(table(asyncio.run(main())))
    print(f"({time.monotonic() - started:.0f} s)")
