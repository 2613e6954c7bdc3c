"""Publishing hostile messages with pika, never through Pigeon's own encoder.

pika sends ``bytes`` short strings and header keys as they are, so it can
put bytes that are not UTF-8 where AMQP expects text, and it encodes header
values (``-1`` as a signed byte, negative decimals) the way RabbitMQ's own
table grammar does.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pika

from tests.conftest import AMQP_URL


def _publish(exchange: str, routing_key: str | bytes, body: bytes, props: dict[str, Any]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange, routing_key, body, pika.BasicProperties(**props), mandatory=False
        )
    finally:
        connection.close()


async def publish(
    exchange: str, routing_key: str | bytes, body: bytes = b"{}", **props: Any
) -> None:
    """Publish one message with pika (confirmed), off the event loop."""
    props.setdefault("delivery_mode", 2)
    await asyncio.to_thread(_publish, exchange, routing_key, body, props)


def _get(queue: str, timeout: float) -> tuple[Any, bytes]:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is not None:
                return properties, body
            time.sleep(0.05)
        raise AssertionError(f"no message on {queue} within {timeout}s")
    finally:
        connection.close()


async def get(queue: str, timeout: float = 10.0) -> tuple[Any, bytes]:
    """One message of ``queue`` as pika decodes it (pamqp misreads negative decimals)."""
    return await asyncio.to_thread(_get, queue, timeout)
