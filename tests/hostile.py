"""Publishing hostile messages with pika, never through Pigeon's own encoder.

pika sends ``bytes`` short strings and header keys as they are, so it can
put bytes that are not UTF-8 where AMQP expects text, and it encodes header
values (``-1`` as a signed byte, negative decimals) the way RabbitMQ's own
table grammar does.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import pika

from pigeon import Pigeon
from tests.conftest import AMQP_URL, AppFactory, Broker
from tests.procs import PIGEON, ROOT, env_for, recorded


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


class Hostile:
    """``pigeon listen tests.apps.hostile:app`` processes sharing one SQLite store."""

    def __init__(self, make_app: AppFactory, broker: Broker, tmp_path: Path) -> None:
        self.app: Pigeon = make_app("hostile")
        self.rec = tmp_path / "rec.txt"
        self.log = tmp_path / "listen.log"
        self.env = env_for(
            self.app.settings,
            self.app.service or "",
            HOSTILE_FILE=str(self.rec),
            PIGEON_IDEMPOTENCY_URL=f"sqlite:///{tmp_path}/idempotency.db",
        )
        self.queue = f"{self.app.service}.record"
        broker.queues |= {self.queue, f"{self.queue}.retry.200ms"}
        broker.track(self.app.settings)

    def start(self, **extra: str) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(
                [*PIGEON, "listen", "tests.apps.hostile:app"],
                env={**self.env, **extra},
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return proc

    def lines(self, kind: str) -> list[str]:
        return recorded(self.rec, kind)


Message = tuple[str | bytes, bytes, dict[str, Any]]


def _publish_all(exchange: str, messages: list[Message]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for routing_key, body, props in messages:
            props = {"delivery_mode": 2, **props}
            channel.basic_publish(exchange, routing_key, body, pika.BasicProperties(**props))
    finally:
        connection.close()


async def publish_all(exchange: str, messages: list[Message]) -> None:
    """Publish ``(routing key, body, properties)`` messages with pika on one connection."""
    await asyncio.to_thread(_publish_all, exchange, messages)
