"""Hostile dead letters, published with pika (never through pigeon's own encoder).

pika writes what pamqp refuses to: a small negative integer as a 32-bit
``I``, ``bytes`` as a byte array ``x``, and (through :class:`RawText`) a long
string ``S`` whose bytes are not UTF-8.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pika

from tests.conftest import AMQP_URL


class RawText(str):
    """A str that pika writes as a long string of arbitrary (not UTF-8) bytes."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawText:
        text = super().__new__(cls, raw.decode("latin-1"))
        text.raw = raw
        return text

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


def _publish(exchange: str, routing_key: str, body: bytes, props: dict[str, Any]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange, routing_key, body, pika.BasicProperties(**props), mandatory=True
        )
    finally:
        connection.close()


async def publish(
    exchange: str,
    routing_key: str,
    body: bytes = b'{"order_id": "o-1"}',
    *,
    headers: dict[str, Any] | None = None,
    **properties: Any,
) -> None:
    """Publish one message with pika, confirmed, from a thread (pika blocks)."""
    props: dict[str, Any] = {"content_type": "application/json", "delivery_mode": 2}
    props.update(properties)
    props["headers"] = headers or {}
    await asyncio.to_thread(_publish, exchange, routing_key, body, props)
