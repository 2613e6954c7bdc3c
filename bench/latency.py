"""Dispatch → handler latency at a steady 500 events/s: pigeon's worker vs raw aio-pika.

Each event carries the wall-clock time it was dispatched (``time.time()``); the
handler subtracts it from its own clock on entry. The figure is therefore
publish + broker (quorum queue, so a Raft commit) + delivery + whatever the
consumer does before user code runs: for pigeon that is decoding, pydantic
validation and the idempotency claim in the default SQLite store. Sends follow
a fixed schedule and do not wait for the previous confirm, so a slow message
never slows the pace, it only shows in the tail.

Publisher and consumer are separate connections in this process (one clock).
Pigeon's worker runs with its defaults (concurrency 10, prefetch 100), raw
aio-pika with prefetch 10 (at 500/s neither has more than a few messages
unacked, so prefetch does not move the figure), and rounds alternate between them so drift on a shared machine hits both. The
start-up heap is frozen out of the garbage collector's full passes first, as
``pigeon listen`` does (``Worker(freeze_heap=True)``); in this one process
that spares every contender the same pauses.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable

import aio_pika

from bench.common import URL, bench_settings, delete, new_prefix, quiet_logs, quorum_sink, table
from pigeon import Event, Pigeon
from pigeon.settings import Settings
from pigeon.worker import Worker

RATE = 500.0
PREFETCH = 10
TARGET_P99_MS = 10.0
RAW_KEY = "bench.latency.raw"


class Ping(Event, name="bench.latency.ping"):
    seq: int
    sent_at: float


def percentile(values: list[float], q: int) -> float:
    """The ``q``-th percentile (1..99) of ``values``, interpolated between samples."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def paced(count: int, rate: float, send: Callable[[int], Awaitable[object]]) -> None:
    """Start ``send(i)`` for ``i < count`` on a fixed schedule of ``rate`` per second.

    Each send is its own task, so a slow confirm never delays the next send.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: set[asyncio.Task[object]] = set()
    for i in range(count):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(send(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


class Recorder:
    """Latencies (seconds) of the measured events; the first ``warmup`` are dropped."""

    def __init__(self, total: int, warmup: int) -> None:
        self.total = total
        self.warmup = warmup
        self.seconds: list[float] = []
        self.seen = 0
        self.done = asyncio.Event()

    def record(self, seq: int, sent_at: float, now: float) -> None:
        if seq >= self.warmup:
            self.seconds.append(now - sent_at)
        self.seen += 1
        if self.seen >= self.total:
            self.done.set()


async def pigeon_round(
    settings: Settings, count: int, warmup: int, store_url: str
) -> tuple[list[float], list[str]]:
    """One round through ``Worker`` with default settings; returns latencies and its queues."""
    app = Pigeon(service=f"{settings.exchange}-latency", settings=settings)
    recorder = Recorder(warmup + count, warmup)

    @app.listener(Ping)
    async def on_ping(e: Ping) -> None:
        recorder.record(e.seq, e.sent_at, time.time())

    worker = Worker(app, handle_signals=False, idempotency_url=store_url)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), 30)
    publisher = Pigeon(service=f"{settings.exchange}-publisher", settings=settings)

    async def send(i: int) -> None:
        await publisher.dispatch_async(Ping(seq=i, sent_at=time.time()))

    await paced(warmup + count, RATE, send)
    await asyncio.wait_for(recorder.done.wait(), 60)
    await publisher.close()
    worker.stop()
    await task
    return recorder.seconds, [q.name for q in app.listener_topology(on_ping).queues]


async def raw_round(settings: Settings, queue_name: str, count: int, warmup: int) -> list[float]:
    """The same round with a plain aio-pika consumer that acks after reading the payload."""
    recorder = Recorder(warmup + count, warmup)
    consumer = await aio_pika.connect(URL)
    channel = await consumer.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    queue = await channel.get_queue(queue_name)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        now = time.time()
        payload = json.loads(message.body)
        recorder.record(payload["seq"], payload["sent_at"], now)
        await message.ack()

    tag = await queue.consume(on_message)
    producer = await aio_pika.connect(URL)
    exchange = await (await producer.channel(publisher_confirms=True)).get_exchange(
        settings.exchange
    )

    async def send(i: int) -> None:
        await exchange.publish(
            aio_pika.Message(
                json.dumps({"seq": i, "sent_at": time.time()}).encode(),
                content_type="application/json",
                message_id=str(uuid.uuid4()),
                type=RAW_KEY,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            RAW_KEY,
        )

    await paced(warmup + count, RATE, send)
    await asyncio.wait_for(recorder.done.wait(), 60)
    await queue.cancel(tag)
    await producer.close()
    await consumer.close()
    return recorder.seconds


async def main(
    count: int = 5_000, rounds: int = 2, warmup: int = 250
) -> list[tuple[str, str, str, str]]:
    gc.collect()
    gc.freeze()
    prefix = new_prefix()
    settings = bench_settings(prefix)
    raw_queue = f"{prefix}.latency-raw"
    queues = [raw_queue, settings.unrouted_queue, settings.dead_letter_queue]
    connection = await aio_pika.connect(URL)
    pigeon_ms: list[float] = []
    memory_ms: list[float] = []
    raw_ms: list[float] = []
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-") as tmp:
        store_url = f"sqlite:///{os.path.join(tmp, 'idem.db')}"
        try:
            declaring = Pigeon(settings=settings)
            await declaring.declare()
            await declaring.close()
            await quorum_sink(connection, settings.exchange, raw_queue, RAW_KEY)
            per_round = count // rounds
            for _ in range(rounds):
                seconds, listener_queues = await pigeon_round(
                    settings, per_round, warmup, store_url
                )
                queues += [q for q in listener_queues if q not in queues]
                pigeon_ms += [s * 1000 for s in seconds]
                seconds, listener_queues = await pigeon_round(
                    settings, per_round, warmup, "memory://"
                )
                memory_ms += [s * 1000 for s in seconds]
                raw_ms += [
                    s * 1000 for s in await raw_round(settings, raw_queue, per_round, warmup)
                ]
        finally:
            await delete(
                connection,
                queues,
                [settings.exchange, settings.unrouted_exchange, settings.dead_letter_exchange],
            )
            await connection.close()
    rate = f"{RATE:,.0f}/s"
    rows = []
    for q in (50, 99):
        p, r = percentile(pigeon_ms, q), percentile(raw_ms, q)
        rows.append(
            (f"latency p{q} at {rate} vs aio-pika", f"{p:.1f} ms", f"{r:.1f} ms", f"{p / r:.2f}x")
        )
    for label, samples in (("sqlite (default)", pigeon_ms), ("memory", memory_ms)):
        p99 = percentile(samples, 99)
        rows.append(
            (
                f"latency p99 at {rate}, idempotency {label}, vs target",
                f"{p99:.1f} ms",
                f"≤ {TARGET_P99_MS:.0f} ms",
                "met" if p99 <= TARGET_P99_MS else "missed",
            )
        )
    return rows


if __name__ == "__main__":
    quiet_logs()
    print(table(asyncio.run(main())))
