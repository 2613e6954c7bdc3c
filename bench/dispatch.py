"""Dispatch throughput: pigeon vs raw aio-pika vs FastStream, confirms on for all.

Sequential (one at a time, waiting for each confirm) and concurrent (256 in
flight) publishing of the same event to a quorum queue. Rounds alternate
between the contenders so drift on a shared machine hits all of them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aio_pika
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange

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
from pigeon import Event, Pigeon


class OrderPlaced(Event, name="bench.order.placed"):
    order_id: str
    customer_email: str
    total_cents: int


def event(i: int) -> OrderPlaced:
    return OrderPlaced(order_id=f"o-{i}", customer_email="a@example.com", total_cents=500 + i)


async def main(
    sequential: int = 1500, concurrent: int = 8000, rounds: int = 3
) -> list[tuple[str, str, str, str]]:
    prefix = new_prefix()
    settings = bench_settings(prefix)
    app = Pigeon(service="bench", settings=settings)
    await app.declare()
    connection = await aio_pika.connect(URL)
    queue = f"{prefix}.sink"
    await quorum_sink(connection, settings.exchange, queue, "#")

    raw_channel = await connection.channel(publisher_confirms=True)
    raw_exchange = await raw_channel.get_exchange(settings.exchange)
    broker = RabbitBroker(URL, logger=None)  # no per-message log lines, as for pigeon
    await broker.connect()
    fs_exchange = RabbitExchange(
        settings.exchange, type=ExchangeType.TOPIC, durable=True, declare=False
    )

    async def raw(i: int) -> None:
        e = event(i)
        await raw_exchange.publish(
            aio_pika.Message(
                json.dumps(e.model_dump()).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(uuid.uuid4()),
                type="bench.order.placed",
                app_id="bench",
                timestamp=datetime.now(UTC),
            ),
            "bench.order.placed",
        )

    async def pigeon(i: int) -> None:
        await app.dispatch_async(event(i))

    async def faststream(i: int) -> None:
        await broker.publish(
            event(i).model_dump(),
            exchange=fs_exchange,
            routing_key="bench.order.placed",
            persist=True,
            message_id=str(uuid.uuid4()),
            message_type="bench.order.placed",
        )

    contenders = {"pigeon": pigeon, "aio-pika": raw, "faststream": faststream}
    seq = {name: Rate(name, []) for name in contenders}
    conc = {name: Rate(name, []) for name in contenders}
    for one in contenders.values():  # warm-up: connections, caches
        await in_flight(200, 50, one)
    for _ in range(rounds):
        for name, one in contenders.items():

            async def run_seq(one: Callable[[int], Awaitable[None]] = one) -> None:
                for i in range(sequential):
                    await one(i)

            async def run_conc(one: Callable[[int], Awaitable[None]] = one) -> None:
                await in_flight(concurrent, 256, one)

            seq[name].per_second.append(await timed(sequential, run_seq))
            conc[name].per_second.append(await timed(concurrent, run_conc))
        await (await raw_channel.get_queue(queue, ensure=False)).purge()

    batch = {name: Rate(name, []) for name in ("pigeon", "aio-pika")}
    for _ in range(rounds):

        async def many() -> None:
            await app.dispatch_many(event(i) for i in range(concurrent))

        batch["pigeon"].per_second.append(await timed(concurrent, many))

        async def raw_256() -> None:
            await in_flight(concurrent, 256, raw)

        batch["aio-pika"].per_second.append(await timed(concurrent, raw_256))
        await (await raw_channel.get_queue(queue, ensure=False)).purge()

    await broker.stop()
    await app.close()
    await delete(
        connection,
        [queue, settings.unrouted_queue, settings.dead_letter_queue],
        [settings.exchange, settings.unrouted_exchange, settings.dead_letter_exchange],
    )
    await connection.close()
    rows = []
    for label, rates in (("dispatch sequential", seq), ("dispatch 256 in flight", conc)):
        p = rates["pigeon"].median
        for peer in ("aio-pika", "faststream"):
            q = rates[peer].median
            rows.append((f"{label} vs {peer}", f"{p:,.0f}/s", f"{q:,.0f}/s", f"{p / q:.2f}x"))
    p, q = batch["pigeon"].median, batch["aio-pika"].median
    rows.append(
        ("dispatch_many vs aio-pika 256 in flight", f"{p:,.0f}/s", f"{q:,.0f}/s", f"{p / q:.2f}x")
    )
    return rows


if __name__ == "__main__":
    quiet_logs()
    print(table(asyncio.run(main())))
