"""LetterThief: how fast the collector stores dead letters, how fast the list answers.

Ingest: 20,000 pigeon dead letters (``x-pigeon-*`` headers, as a failing
listener publishes them) wait in the dead-letter queue of throwaway settings;
then LetterThief starts with its defaults on a SQLite file and the clock runs
until the collector has stored the last one (connecting included).

List: a store filled with 100,000 letters (20 queues, 6 exception types,
7 events) through ``Store.ingest``, then 200 requests each of the API list,
the API list filtered by queue, and the UI list page, with a login configured.
The time is the ASGI call itself (no network, no HTTP client): what the
server spends, database included.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import httpx
from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from bench.common import URL, bench_settings, delete, new_prefix, quiet_logs, table
from bench.latency import percentile
from letterthief.parse import Received, describe
from letterthief.service import LetterThief
from letterthief.settings import LetterThiefSettings
from letterthief.store import Stored
from letterthief.web import create_app
from pigeon import headers as h
from pigeon.amqp import declare
from pigeon.core import topology
from pigeon.settings import Settings

QUEUES = tuple(
    f"{service}.{listener}"
    for service in ("billing", "shipping", "email", "inventory", "search")
    for listener in ("on-order-placed", "on-order-paid", "on-refund", "reindex")
)
EVENTS = (
    "order.placed",
    "order.paid",
    "order.shipped",
    "order.refunded",
    "customer.created",
    "stock.changed",
    "invoice.issued",
)
EXCEPTIONS = (
    ("ValueError", "no partner for region eu-{n}"),
    ("KeyError", "'sku-{n}'"),
    ("TimeoutError", "payment gateway did not answer within 10 s"),
    ("httpx.ConnectError", "All connection attempts failed (stock-{n}.internal)"),
    ("pydantic.ValidationError", "1 validation error for Order: total_cents"),
    ("RuntimeError", "inventory service answered 503 for order o-{n}"),
)
TARGET_INGEST = 2_000.0
TARGET_P95_MS = 200.0
USERNAME, PASSWORD, TOKEN = "ops", "bench-password", "bench-token"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The ``i``-th dead letter as a pigeon listener would publish it."""

    queue: str
    body: bytes
    headers: dict[str, Any]
    properties: dict[str, Any]

    @classmethod
    def make(cls, i: int) -> DeadLetter:
        queue = QUEUES[i % len(QUEUES)]
        exc_type, exc_message = EXCEPTIONS[i % len(EXCEPTIONS)]
        message_id = str(uuid.uuid4())
        failed_at = datetime.now(UTC) - timedelta(seconds=i)
        headers: dict[str, Any] = {
            h.REASON: h.Reason.HANDLER_ERROR,
            h.EXCEPTION_TYPE: exc_type,
            h.EXCEPTION_MESSAGE: exc_message.format(n=i % 50),
            h.TRACEBACK: f"Traceback (most recent call last):\n  ...\n{exc_type}",
            h.QUEUE: queue,
            h.LISTENER: queue.split(".", 1)[1],
            h.ATTEMPTS: 5,
            h.FAILED_AT: failed_at.isoformat(timespec="milliseconds"),
            h.SERVICE: queue.split(".", 1)[0],
        }
        properties = {
            "message_id": message_id,
            "type": EVENTS[i % len(EVENTS)],
            "content_type": "application/json",
            "correlation_id": message_id,
            "app_id": "orders",
        }
        body = b'{"order_id": "o-%d", "customer_email": "a@example.com", "total_cents": %d}' % (
            i,
            500 + i,
        )
        return cls(queue, body, headers, properties)

    def message(self) -> aio_pika.Message:
        p = self.properties
        return aio_pika.Message(
            self.body,
            headers=self.headers,
            message_id=p["message_id"],
            type=p["type"],
            content_type=p["content_type"],
            correlation_id=p["correlation_id"],
            app_id=p["app_id"],
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    def received(self, settings: Settings) -> Received:
        return describe(
            body=self.body,
            headers=self.headers,
            properties=self.properties,
            exchange=settings.dead_letter_exchange,
            routing_key=self.queue,
            events_exchange=settings.exchange,
        )


def lt_settings(database: str) -> LetterThiefSettings:
    return LetterThiefSettings(
        database_url=f"sqlite:///{database}",
        username=USERNAME,
        password=SecretStr(PASSWORD),
        api_token=SecretStr(TOKEN),
        secret_key=SecretStr("bench-secret"),
    )


async def publish_dead_letters(settings: Settings, count: int) -> None:
    connection = await aio_pika.connect(URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(settings.dead_letter_exchange)
    semaphore = asyncio.Semaphore(512)

    async def one(i: int) -> None:
        letter = DeadLetter.make(i)
        async with semaphore:
            await exchange.publish(letter.message(), letter.queue)

    await asyncio.gather(*(one(i) for i in range(count)))
    await connection.close()


async def ingest_rate(settings: Settings, database: str, count: int) -> float:
    """Letters per second from ``LetterThief.start()`` until ``count`` are stored."""
    await publish_dead_letters(settings, count)
    thief = LetterThief(lt_settings(database), settings)
    await thief.open()
    stored = 0
    done = asyncio.Event()
    alerter = thief.collector.on_stored

    def on_stored(batch: list[Stored]) -> None:
        nonlocal stored
        stored += len(batch)
        if alerter is not None:
            alerter(batch)
        if stored >= count:
            done.set()

    thief.collector.on_stored = on_stored
    started = time.perf_counter()
    await thief.start()
    try:
        await asyncio.wait_for(done.wait(), 300)
        return count / (time.perf_counter() - started)
    finally:
        await thief.stop()


class Timed:
    """An ASGI app that records how long each call to the app it wraps takes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seconds: list[float] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        await self.app(scope, receive, send)
        self.seconds.append(time.perf_counter() - started)


async def log_in(client: httpx.AsyncClient) -> None:
    page = await client.get("/login")
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, "no CSRF token on the login page"
    response = await client.post(
        "/login",
        data={"csrf": found[1], "username": USERNAME, "password": PASSWORD, "next": "/"},
    )
    assert response.status_code == 303, f"login failed: {response.status_code}"


async def list_p95(
    settings: Settings, database: str, count: int, requests: int, batch: int = 1_000
) -> dict[str, float]:
    """p95 milliseconds of each list request over a store of ``count`` letters."""
    thief = LetterThief(lt_settings(database), settings)
    await thief.open()
    try:
        for start in range(0, count, batch):
            await thief.store.ingest(
                [DeadLetter.make(i).received(settings) for i in range(start, start + batch)]
            )
        timed = Timed(create_app(thief))
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        routes: dict[str, Callable[[int], tuple[str, dict[str, str]]]] = {
            "GET /api/dead-letters": lambda i: ("/api/dead-letters", bearer),
            "GET /api/dead-letters?queue=": lambda i: (
                f"/api/dead-letters?queue={QUEUES[i % len(QUEUES)]}",
                bearer,
            ),
            "GET /letters (UI)": lambda i: ("/letters", {}),
        }
        p95: dict[str, float] = {}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=timed), base_url="http://letterthief.bench"
        ) as client:
            await log_in(client)
            for label, request in routes.items():
                timed.seconds.clear()
                for i in range(requests):
                    url, headers = request(i)
                    response = await client.get(url, headers=headers)
                    assert response.status_code == 200, f"{url}: {response.status_code}"
                p95[label] = percentile([s * 1000 for s in timed.seconds], 95)
        return p95
    finally:
        await thief.stop()


async def main(
    dead_letters: int = 20_000, letters: int = 100_000, requests: int = 200
) -> list[tuple[str, str, str, str]]:
    settings = bench_settings(new_prefix())
    core = topology.core_topology(settings)
    connection = await aio_pika.connect(URL)
    try:
        await declare(connection, core)
        with tempfile.TemporaryDirectory(prefix="letterthief-bench-") as tmp:
            rate = await ingest_rate(settings, f"{tmp}/ingest.db", dead_letters)
            p95 = await list_p95(settings, f"{tmp}/list.db", letters, requests)
    finally:
        await delete(connection, [q.name for q in core.queues], [x.name for x in core.exchanges])
        await connection.close()
    rows = [
        (
            f"letterthief collector ingest, {dead_letters // 1000}k dead letters",
            f"{rate:,.0f}/s",
            f"≥ {TARGET_INGEST:,.0f}/s",
            "met" if rate >= TARGET_INGEST else "missed",
        )
    ]
    for label, ms in p95.items():
        rows.append(
            (
                f"letterthief {label} p95, {letters // 1000}k letters",
                f"{ms:.1f} ms",
                f"≤ {TARGET_P95_MS:.0f} ms",
                "met" if ms <= TARGET_P95_MS else "missed",
            )
        )
    return rows


if __name__ == "__main__":
    quiet_logs()
    print(table(asyncio.run(main())))
