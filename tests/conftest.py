"""Fixtures shared by the whole suite: unique broker names per test, cleaned up after.

Every test gets its own exchanges (``t<id>.events`` …) and queues, so tests
never see each other's messages and can run against one shared RabbitMQ.
The ``broker`` fixture deletes what a test declared, even when it fails
midway; when the run ends, :mod:`tests.leaks` checks that no name with one of
the run's prefixes is left on the broker (``PIGEON_TEST_URL`` picks the
broker, ``PIGEON_TEST_NODE`` its node for ``rabbitmqctl``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest
import structlog
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import ChannelNotFoundEntity

from pigeon import Pigeon, Retry
from pigeon.retry import tier_queue
from pigeon.settings import Settings
from pigeon.worker import Worker
from tests import leaks

AMQP_URL = os.environ.get("PIGEON_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/")
AMQP_HOST = urlsplit(AMQP_URL).hostname or "127.0.0.1"
AMQP_PORT = urlsplit(AMQP_URL).port or 5672


def broker_url(
    user: str = "guest", password: str = "guest", vhost: str = "", *, scheme: str = "amqp"
) -> str:
    """A URL for the test broker (``PIGEON_TEST_URL``'s host and port) with other parts."""
    return f"{scheme}://{user}:{password}@{AMQP_HOST}:{AMQP_PORT}/{vhost}"


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


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the run if its tests left queues or exchanges on the broker (see tests.leaks)."""
    if leaks.enabled():
        report = leaks.check(AMQP_URL)
        session.config.stash[_LEAKS] = report
        if report.failed:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    report = terminalreporter.config.stash.get(_LEAKS, None)
    if report is not None and report.failed:
        terminalreporter.section("broker leaks", red=True)
        for line in report.lines():
            terminalreporter.line(line, red=True)


_LEAKS = pytest.StashKey[leaks.Report]()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return leaks.new_prefix(request.node.nodeid)


@pytest.fixture
def settings(prefix: str, broker: Broker) -> Settings:
    """This test's settings; the ``broker`` fixture deletes their exchanges and queues."""
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
        mine = unique_settings(self.prefix)
        names_q |= {mine.dead_letter_queue, mine.unrouted_queue}
        names_x |= {mine.exchange, mine.dead_letter_exchange, mine.unrouted_exchange}
        for app in self.apps:
            with contextlib.suppress(Exception):
                await app.close()
            topo = app.topology()
            names_q |= {q.name for q in topo.queues}
            names_x |= {x.name for x in topo.exchanges}
        names_q |= {tier_queue(queue, delay) for queue in names_q for delay in _COMMON_TIERS}
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


# Retry tier delays a test may give a listener run in another process, whose topology this
# process cannot ask for; deleting a queue that does not exist is harmless.
_COMMON_TIERS = (0.1, 0.2, 0.25, 0.3, 0.5, 1, 2, 5, 10, *Retry().tier_delays())


@contextlib.asynccontextmanager
async def open_broker(prefix: str, url: str = AMQP_URL) -> AsyncIterator[Broker]:
    """A :class:`Broker` on ``url`` that deletes what the test made under ``prefix`` when
    the block ends, whether the test passed or failed."""
    b = Broker(await aio_pika.connect(url), prefix, url=url)
    try:
        yield b
    finally:
        try:
            await b.cleanup()
        finally:
            await b.connection.close()


@pytest.fixture
async def broker(prefix: str) -> AsyncIterator[Broker]:
    async with open_broker(prefix) as b:
        yield b


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
async def run_worker(broker: Broker) -> AsyncIterator[RunWorker]:
    """Start a worker in the background; it is stopped and drained when the test ends.

    It asks for ``broker`` so that the workers stop before the broker fixture deletes
    their queues: a running worker re-subscribes to a deleted queue, declaring it again.
    """
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
