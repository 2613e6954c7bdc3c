"""The peers of ``bench.listen``, each run as its own process: ``python -m bench.peers NAME``.

- ``faststream``: FastStream's default subscriber (no prefetch, default
  logger), validating the order with pydantic, run as ``faststream run`` runs it.
- ``aio-pika``: a plain aio-pika consumer, prefetch 100, ``json.loads`` and
  ack each message.
- ``pika-consume``: the broker's ceiling: pika, auto-ack, nothing decoded.
- ``pika-publish``: the broker's ceiling for publishing: pika, no confirms.

The queue (``BENCH_QUEUE``) exists already; the meter writes the result.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from bench.orders import COUNT_ENV, QUEUE_ENV, RESULT_ENV, Meter, Order, body

URL = os.environ.get("PIGEON_BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/")


def faststream() -> None:
    from faststream import FastStream
    from faststream.rabbit import RabbitBroker, RabbitQueue

    broker = RabbitBroker(URL)
    meter = Meter()

    @broker.subscriber(RabbitQueue(os.environ[QUEUE_ENV], durable=True, declare=False))
    async def handle(order: Order) -> None:
        meter.tick()

    asyncio.run(FastStream(broker).run())


def aio_pika_consumer() -> None:
    import aio_pika

    async def run() -> None:
        meter = Meter()
        connection = await aio_pika.connect(URL)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        queue = await channel.get_queue(os.environ[QUEUE_ENV], ensure=False)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            json.loads(message.body)
            await message.ack()
            meter.tick()

        await queue.consume(on_message)
        await asyncio.Future()

    asyncio.run(run())


def pika_consume() -> None:
    import pika

    meter = Meter()
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()

    def on_message(*_: object) -> None:
        meter.tick()

    channel.basic_consume(os.environ[QUEUE_ENV], on_message, auto_ack=True)
    channel.start_consuming()


def pika_publish() -> None:
    import pika

    count = int(os.environ[COUNT_ENV])
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    queue = os.environ[QUEUE_ENV]
    payload = body(0, 300)
    properties = pika.BasicProperties(
        content_type="application/json", delivery_mode=2, type="bench.cli.order.placed"
    )
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        channel.basic_publish("", queue, payload, properties)
    connection.process_data_events(0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    connection.close()
    with open(os.environ[RESULT_ENV], "w", encoding="utf-8") as f:
        json.dump({"rate": count / wall, "cpu_us": cpu / count * 1e6}, f)


PEERS = {
    "faststream": faststream,
    "aio-pika": aio_pika_consumer,
    "pika-consume": pika_consume,
    "pika-publish": pika_publish,
}

if __name__ == "__main__":
    PEERS[sys.argv[1]]()
