"""LetterThief fixtures: stores on SQLite and PostgreSQL, a running service, a Slack stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped,unused-ignore]
import httpx
import pytest

from letterthief.models import Letter
from letterthief.parse import Received, describe
from letterthief.queries import Filters
from letterthief.service import LetterThief
from letterthief.settings import LetterThiefSettings
from letterthief.store import Store
from pigeon.settings import Settings

PG_ADMIN_URL = os.environ.get("LETTERTHIEF_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.asynccontextmanager
async def postgres_database(kind: str = "lt") -> AsyncIterator[str]:
    """A new, empty PostgreSQL database (``{kind}_<hex>``) for one test; its asyncpg URL.
    Dropped when the block ends, connections and all."""
    name = f"{kind}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database: a SQLite file, or a new PostgreSQL database dropped after."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'letterthief.db'}"
        return
    async with postgres_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'letterthief.db'}"


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    async with Store(database_url) as s:
        yield s


@pytest.fixture
async def sqlite_store(sqlite_url: str) -> AsyncIterator[Store]:
    async with Store(sqlite_url) as s:
        yield s


def received(
    message_id: str | None = None,
    *,
    queue: str = "billing.charge-card",
    event: str = "order.placed",
    exception_type: str = "ValueError",
    exception_message: str = "no partner for region",
    reason: str = "handler-error",
    body: bytes = b'{"order_id": "o-1"}',
    correlation_id: str | None = None,
    failed_at: datetime | None = None,
    redelivered: bool = False,
) -> Received:
    """A pigeon dead letter as the collector would read it, without a broker."""
    message_id = message_id or str(uuid.uuid4())
    failed_at = failed_at or datetime.now(UTC)
    headers = {
        "x-pigeon-reason": reason,
        "x-pigeon-exception-type": exception_type,
        "x-pigeon-exception-message": exception_message,
        "x-pigeon-traceback": "Traceback (most recent call last):\n  ...\nValueError",
        "x-pigeon-queue": queue,
        "x-pigeon-attempts": 3,
        "x-pigeon-failed-at": failed_at.isoformat(),
        "x-pigeon-service": queue.split(".")[0],
    }
    properties = {
        "message_id": message_id,
        "type": event,
        "content_type": "application/json",
        "correlation_id": correlation_id or message_id,
        "app_id": "orders",
    }
    return describe(
        body=body,
        headers=headers,
        properties=properties,
        exchange="pigeon.dead",
        routing_key=queue,
        events_exchange="pigeon.events",
        redelivered=redelivered,
    )


def lt_settings(database_url: str, **overrides: Any) -> LetterThiefSettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "username": "ops",
        "password": "s3cret",
        "api_token": "tok-123",
        "secret_key": "test-secret",
        "batch_wait": 0.01,
        "public_url": "http://letterthief.test",
    }
    values.update(overrides)
    return LetterThiefSettings(**values)


@pytest.fixture
async def thief(settings: Settings, sqlite_url: str, broker: Any) -> AsyncIterator[LetterThief]:
    """A started LetterThief (collector running) on this test's exchanges and a SQLite file."""
    service = LetterThief(lt_settings(sqlite_url), settings)
    broker.queues |= {settings.dead_letter_queue, settings.unrouted_queue}
    broker.exchanges |= {
        settings.dead_letter_exchange,
        settings.unrouted_exchange,
        settings.exchange,
    }
    await service.start()
    try:
        await asyncio.wait_for(service.collector.ready.wait(), 20)
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def client(thief: LetterThief) -> AsyncIterator[httpx.AsyncClient]:
    """An API client authenticated with the Bearer token."""
    from letterthief.web import create_app

    transport = httpx.ASGITransport(app=create_app(thief))
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://letterthief.test",
        headers={"Authorization": "Bearer tok-123"},
    ) as c:
        yield c


@dataclass
class SlackStandIn:
    """A local HTTP server that records webhook posts and answers as told."""

    url: str
    posts: list[dict[str, Any]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    responses: list[tuple[int, dict[str, str]]] = field(default_factory=list)

    def texts(self) -> list[str]:
        return [str(p.get("text", "")) for p in self.posts]


@pytest.fixture
def slack() -> Iterator[SlackStandIn]:
    stand_in = SlackStandIn(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            payload = json.loads(self.rfile.read(length) or b"{}")
            status, headers = stand_in.responses.pop(0) if stand_in.responses else (200, {})
            if status == 200:
                stand_in.posts.append(payload)
                stand_in.times.append(time.monotonic())
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            body = b"ok" if status == 200 else b"rate_limited"
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stand_in.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/T000/B000"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stand_in
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def letters_when(
    store: Store,
    count: int,
    filters: Filters | None = None,
    *,
    timeout: float = 15.0,
    occurrences: int | None = None,
) -> list[Letter]:
    """Poll the store until ``count`` letters match (each with ``occurrences``, if given)."""
    deadline = asyncio.get_running_loop().time() + timeout
    items: list[Letter] = []
    while True:
        items = (await store.page(filters or Filters(), limit=500)).items
        if len(items) == count and (
            occurrences is None or all(i.occurrences == occurrences for i in items)
        ):
            return items
        if asyncio.get_running_loop().time() > deadline:
            got = [(i.message_id, i.queue, i.occurrences) for i in items]
            raise AssertionError(f"expected {count} letters within {timeout}s, have {got}")
        await asyncio.sleep(0.05)
