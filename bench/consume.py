"""Consume throughput: ``pigeon listen``'s worker vs FastStream vs raw aio-pika.

Each contender drains the same number of pre-published events from its own
quorum queue, acking each message after its handler returns, with the same
prefetch. Pigeon is measured with its defaults (pydantic validation + SQLite
idempotency) and with the other stores and idempotency off.

Besides the rate, each run reports this process's CPU time per message (all
threads, so the SQLite store's thread counts). The broker shares the machine,
so the rate moves with the disk and with neighbours; CPU per message is the
steadier measure of what the consumer itself costs.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import aio_pika
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

from bench.common import URL, bench_settings, delete, new_prefix, quiet_logs, table
from bench.dispatch import OrderPlaced, event
from pigeon import Pigeon
from pigeon.retry import tier_label
from pigeon.settings import Settings
from pigeon.worker import Worker

PREFETCH = 64


@dataclass(frozen=True)
class Run:
    """One drain: messages per second, and CPU microseconds of this process per message."""

    rate: float
    cpu_us: float


class Clock:
    """Wall and process CPU time from construction to :meth:`stop`."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def stop(self, count: int) -> Run:
        wall = time.perf_counter() - self.wall
        cpu = time.process_time() - self.cpu
        return Run(count / wall, cpu / count * 1e6)


async def fill(connection: aio_pika.abc.AbstractConnection, queue: str, count: int) -> None:
    """Publish ``count`` events straight into ``queue`` (default exchange), confirmed."""
    channel = await connection.channel(publisher_confirms=True)
    semaphore = asyncio.Semaphore(512)

    async def one(i: int) -> None:
        async with semaphore:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    event(i).to_json(),
                    content_type="application/json",
                    message_id=str(uuid.uuid4()),
                    type="bench.order.placed",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                queue,
            )

    await asyncio.gather(*(one(i) for i in range(count)))
    await channel.close()


async def pigeon_rate(settings: Settings, count: int, *, idempotent: bool, store_url: str) -> Run:
    app = Pigeon(service=f"{settings.exchange}-svc", settings=settings)
    done = asyncio.Event()
    seen = 0

    @app.listener(OrderPlaced, idempotent=idempotent)
    async def handle(e: OrderPlaced) -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            done.set()

    await app.declare()
    connection = await aio_pika.connect(URL)
    await fill(connection, handle.queue, count)
    worker = Worker(
        app,
        handle_signals=False,
        concurrency=PREFETCH,
        prefetch=PREFETCH,
        idempotency_url=store_url,
    )
    task = asyncio.create_task(worker.run())
    await worker.ready.wait()
    clock = Clock()
    await done.wait()
    run = clock.stop(count)
    worker.stop()
    await task
    tiers = [f"{handle.queue}.retry.{tier_label(d)}" for d in handle.retry.tier_delays()]
    await delete(connection, [handle.queue, *tiers], [])
    await connection.close()
    if store_url.startswith("redis"):
        from bench.listen import forget_redis_keys

        await forget_redis_keys(handle.queue)
    return run


async def faststream_rate(prefix: str, count: int) -> Run:
    connection = await aio_pika.connect(URL)
    queue = f"{prefix}.faststream"
    channel = await connection.channel()
    await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
    await fill(connection, queue, count)
    broker = RabbitBroker(URL, logger=None)  # no per-message log lines, as for pigeon
    done = asyncio.Event()
    seen = 0

    @broker.subscriber(
        RabbitQueue(queue, durable=True, declare=False), channel=Channel(prefetch_count=PREFETCH)
    )
    async def handle(e: OrderPlaced) -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            done.set()

    clock = Clock()
    await broker.start()
    await done.wait()
    run = clock.stop(count)
    await broker.stop()
    await channel.queue_delete(queue)
    await connection.close()
    return run


async def raw_rate(prefix: str, count: int) -> Run:
    connection = await aio_pika.connect(URL)
    queue_name = f"{prefix}.raw"
    channel = await connection.channel()
    queue = await channel.declare_queue(
        queue_name, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await fill(connection, queue_name, count)
    await channel.set_qos(prefetch_count=PREFETCH)
    done = asyncio.Event()
    seen = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal seen
        await message.ack()
        seen += 1
        if seen == count:
            done.set()

    clock = Clock()
    tag = await queue.consume(on_message)
    await done.wait()
    run = clock.stop(count)
    await queue.cancel(tag)
    await channel.queue_delete(queue_name)
    await connection.close()
    return run


async def best_of(rounds: int, run: Callable[[], Awaitable[Run]]) -> Run:
    """The fastest rate and the lowest CPU per message of ``rounds`` runs: the least disturbed."""
    runs = [await run() for _ in range(rounds)]
    return Run(max(r.rate for r in runs), min(r.cpu_us for r in runs))


def compare(label: str, mine: Run, peer_name: str, peer: Run) -> list[tuple[str, str, str, str]]:
    """A rate row (higher is better) and a CPU row (lower is better) against ``peer``."""
    return [
        (
            f"consume, {label} vs {peer_name}",
            f"{mine.rate:,.0f}/s",
            f"{peer.rate:,.0f}/s",
            f"{mine.rate / peer.rate:.2f}x",
        ),
        (
            f"consume CPU per message, {label} vs {peer_name}",
            f"{mine.cpu_us:.0f} µs",
            f"{peer.cpu_us:.0f} µs",
            f"{mine.cpu_us / peer.cpu_us:.2f}x",
        ),
    ]


async def main(count: int = 10_000, rounds: int = 2) -> list[tuple[str, str, str, str]]:
    prefix = new_prefix()
    settings = bench_settings(prefix)
    tmp = tempfile.mkdtemp(prefix="pigeon-bench-")
    stores = {
        "sqlite (default)": f"sqlite:///{os.path.join(tmp, 'idem.db')}",
        "memory": "memory://",
        "redis": "redis://127.0.0.1:6379/0",
        "postgres": "postgresql://postgres@127.0.0.1:5432/test",
    }
    raw = await best_of(rounds, lambda: raw_rate(prefix, count))
    fast = await best_of(rounds, lambda: faststream_rate(prefix, count))
    rows = []
    for label, url in stores.items():
        mine = await best_of(
            rounds, partial(pigeon_rate, settings, count, idempotent=True, store_url=url)
        )
        rows += compare(f"idempotency {label}", mine, "faststream", fast)
        rows += compare(f"idempotency {label}", mine, "aio-pika", raw)
    off = await best_of(
        rounds, lambda: pigeon_rate(settings, count, idempotent=False, store_url="memory://")
    )
    rows += compare("idempotency off", off, "faststream", fast)
    rows += compare("idempotency off", off, "aio-pika", raw)
    connection = await aio_pika.connect(URL)
    await delete(
        connection,
        [settings.unrouted_queue, settings.dead_letter_queue],
        [settings.exchange, settings.unrouted_exchange, settings.dead_letter_exchange],
    )
    await connection.close()
    return rows


if __name__ == "__main__":
    quiet_logs()
    print(table(asyncio.run(main())))
