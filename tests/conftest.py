"""Fixtures shared by the whole suite: unique broker names per test, cleaned up after.

Every test gets its own exchanges (``t<id>.events`` …) and queues, so tests
never see each other's messages and can run against one shared RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aio_pika
import pytest
import structlog
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import ChannelNotFoundEntity

from pigeon import Pigeon
from pigeon.settings import Settings
from pigeon.worker import Worker

AMQP_URL = os.environ.get("PIGEON_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/")


def unique_settings(prefix: str, **overrides: Any) -> Settings:
    """Settings whose shared exchanges and queues belong to one test only."""
    values: dict[str, Any] = {
        "url": AMQP_URL,
        "exchange": f"{prefix}.events",
        "dead_letter_exchange": f"{prefix}.dead",
        "dead_letter_queue": f"{prefix}.dead-letters",
        "unrouted_exchange": f"{prefix}.unrouted",
        "unrouted_queue": f"{prefix}.unrouted",
        "idempotency_url": "memory://",
        "dispatch_timeout": 10.0,
        "log_format": "json",
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``PIGEON_*`` environment that reproduces ``settings`` in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}
    for name in (
        "url",
        "exchange",
        "dead_letter_exchange",
        "dead_letter_queue",
        "unrouted_exchange",
        "unrouted_queue",
        "idempotency_url",
        "dispatch_timeout",
        "log_format",
    ):
        env[f"PIGEON_{name.upper()}"] = str(getattr(settings, name))
    if settings.service:
        env["PIGEON_SERVICE"] = settings.service
    return env


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """CLIs run in-process configure logging globally; each test starts from the defaults."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(prefix: str) -> Settings:
    return unique_settings(prefix)


class Broker:
    """A raw aio-pika view of the broker for assertions, plus cleanup of what tests made."""

    def __init__(self, connection: AbstractConnection, prefix: str, url: str = AMQP_URL) -> None:
        self._connection = connection
        self.prefix = prefix
        self.url = url
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()
        self.apps: list[Pigeon] = []

    @property
    def connection(self) -> AbstractConnection:
        return self._connection

    async def reconnect(self) -> None:
        """A fresh connection, after a test restarted the broker under the old one."""
        with contextlib.suppress(Exception):
            await self._connection.close()
        self._connection = await aio_pika.connect(self.url)

    async def get(self, queue: str, timeout: float = 10.0) -> aio_pika.abc.AbstractIncomingMessage:
        """Wait for one message on ``queue`` (which may not exist yet) and ack it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        channel = await self.connection.channel()
        try:
            while True:
                try:
                    q = await channel.get_queue(queue, ensure=False)
                    message = await q.get(fail=False)
                except ChannelNotFoundEntity:
                    channel = await self.connection.channel()
                    message = None
                if message is not None:
                    await message.ack()
                    return message
                if loop.time() > deadline:
                    raise AssertionError(f"no message arrived on {queue} within {timeout}s")
                await asyncio.sleep(0.05)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def wait_count(self, queue: str, expected: int, timeout: float = 10.0) -> int:
        """The message count of ``queue`` once it reached ``expected`` (or the timeout)."""
        deadline = asyncio.get_running_loop().time() + timeout
        count = await self.count(queue)
        while count < expected and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            count = await self.count(queue)
        return count

    def track(self, settings: Settings) -> None:
        """Delete the shared exchanges and queues of ``settings`` after the test."""
        self.queues |= {settings.unrouted_queue, settings.dead_letter_queue}
        self.exchanges |= {
            settings.exchange,
            settings.unrouted_exchange,
            settings.dead_letter_exchange,
        }

    async def count(self, queue: str) -> int:
        channel = await self.connection.channel()
        try:
            q = await channel.declare_queue(queue, passive=True)
            return q.declaration_result.message_count or 0
        finally:
            await channel.close()

    async def cleanup(self) -> None:
        try:
            probe = await self._connection.channel()
            await probe.close()
        except Exception:  # the broker was restarted under this connection
            await self.reconnect()
        names_q = set(self.queues)
        names_x = set(self.exchanges)
        for app in self.apps:
            with contextlib.suppress(Exception):
                await app.close()
            topo = app.topology()
            names_q |= {q.name for q in topo.queues}
            names_x |= {x.name for x in topo.exchanges}
            for listener in app.listeners:
                names_q |= {f"{listener.queue}.retry.{s}" for s in _COMMON_TIERS}
        channel = await self.connection.channel()
        for name in names_q:
            with contextlib.suppress(Exception):
                if channel.is_closed:
                    channel = await self.connection.channel()
                await channel.queue_delete(name)
        for name in names_x:
            with contextlib.suppress(Exception):
                if channel.is_closed:
                    channel = await self.connection.channel()
                await channel.exchange_delete(name)
        with contextlib.suppress(Exception):
            await channel.close()


_COMMON_TIERS = ("100ms", "200ms", "250ms", "300ms", "500ms", "1s", "2s", "5s", "10s")


@pytest.fixture
async def broker(prefix: str) -> AsyncIterator[Broker]:
    connection = await aio_pika.connect(AMQP_URL)
    b = Broker(connection, prefix)
    try:
        yield b
    finally:
        await b.cleanup()
        await b.connection.close()


AppFactory = Callable[..., Pigeon]


@pytest.fixture
def make_app(settings: Settings, broker: Broker, prefix: str) -> AppFactory:
    """``make_app("notification")`` → a Pigeon app on this test's exchanges; cleaned up after."""

    def make(service: str = "svc", **kwargs: Any) -> Pigeon:
        app = Pigeon(service=f"{prefix}-{service}", settings=settings, **kwargs)
        broker.apps.append(app)
        return app

    return make


RunWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def run_worker() -> AsyncIterator[RunWorker]:
    """Start a worker in the background; it is stopped and drained when the test ends."""
    running: list[tuple[Worker, asyncio.Task[int]]] = []

    async def start(app: Pigeon, **kwargs: Any) -> Worker:
        kwargs.setdefault("handle_signals", False)
        kwargs.setdefault("shutdown_timeout", 5.0)
        worker = Worker(app, **kwargs)
        task = asyncio.create_task(worker.run())
        running.append((worker, task))
        ready = asyncio.create_task(worker.ready.wait())
        done, _ = await asyncio.wait({ready, task}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            ready.cancel()
            task.result()
            raise AssertionError("worker stopped before it was ready")
        if ready not in done:
            ready.cancel()
            raise AssertionError("worker was not consuming within 20s")
        return worker

    yield start
    for worker, task in running:
        worker.stop("test finished")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 20)
    for worker, _ in running:
        with contextlib.suppress(Exception):
            await worker.app.close()


async def eventually(
    check: Callable[[], bool], timeout: float = 15.0, message: str = "condition"
) -> None:
    """Wait until ``check()`` is true, failing the test after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{message} not reached within {timeout}s")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[str]:
    """The three-node cluster of ``scripts/cluster.sh`` (pigeon1..3@localhost, 5701-5703),
    started once per test run and stopped after it; its ``PIGEON_URL``. A cluster that was
    already running (``make cluster``) is used and left running."""
    from tests import rabbit

    started = not rabbit.cluster_is_up()
    if started:
        rabbit.start_cluster()
    try:
        yield rabbit.cluster_url()
    finally:
        if started:
            rabbit.stop_cluster()
