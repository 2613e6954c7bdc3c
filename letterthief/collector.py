"""The collector: drains the dead-letter and unrouted queues into the store.

Nothing is acked before the database committed it. Messages are stored in
batches (``LETTERTHIEF_BATCH_SIZE``, or whatever arrived within
``LETTERTHIEF_BATCH_WAIT`` seconds) and acked with one ``multiple`` ack. When
the database is down the batch is retried with backoff while its messages
stay unacked in RabbitMQ (the prefetch window stops the intake); if the
process dies meanwhile, RabbitMQ redelivers them to the next collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from tenacity import (
    RetryCallState,
    retry_if_exception_type,
)

from letterthief import parse
from letterthief.metrics import Metrics
from letterthief.settings import LetterThiefSettings
from letterthief.store import Store, Stored
from pigeon.amqp import RETRYABLE, Connector, backoff, declare, supervise
from pigeon.core.topology import core_topology
from pigeon.errors import BrokerRefused, TopologyError
from pigeon.logs import get_logger
from pigeon.settings import Settings

log = get_logger("letterthief")

OnStored = Callable[[list[Stored]], None]


class _Drain:
    """One consumed queue: a buffer of received messages and the task that commits it."""

    def __init__(self, collector: Collector, queue: str, unrouted: bool) -> None:
        self.collector = collector
        self.queue = queue
        self.unrouted = unrouted
        self.buffer: list[tuple[AbstractIncomingMessage, parse.Received]] = []
        self.pending = asyncio.Event()
        self.full = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.channel: AbstractChannel | None = None
        self.consumer: tuple[AbstractQueue, str] | None = None

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        c = self.collector
        try:
            received = parse.read(
                message,
                events_exchange=c.pigeon.exchange,
                unrouted_queue=self.queue if self.unrouted else None,
            )
        except Exception as exc:  # never drop or loop on a letter we cannot read
            log.exception("letter.unreadable", queue=self.queue, error=repr(exc))
            received = parse.describe(
                body=message.body,
                headers={},
                properties={"message_id": message.message_id} if message.message_id else {},
                exchange=message.exchange or "",
                routing_key=message.routing_key or "",
                redelivered=bool(message.redelivered),
            )
        self.buffer.append((message, received))
        self.pending.set()
        if len(self.buffer) >= c.settings.batch_size:
            self.full.set()

    async def run(self) -> None:
        c = self.collector
        while True:
            await self.pending.wait()
            if len(self.buffer) < c.settings.batch_size and c.settings.batch_wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.full.wait(), c.settings.batch_wait)
            batch, self.buffer = self.buffer, []
            self.pending.clear()
            self.full.clear()
            if batch:
                await c.commit(self, batch)


class Collector:
    """Consumes ``pigeon.dead-letters`` and ``pigeon.unrouted`` until stopped."""

    def __init__(
        self,
        store: Store,
        pigeon: Settings,
        settings: LetterThiefSettings,
        *,
        metrics: Metrics | None = None,
        on_stored: OnStored | None = None,
    ) -> None:
        self.store = store
        self.pigeon = pigeon
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.on_stored = on_stored
        self.connector = Connector.for_settings(
            pigeon, name="letterthief-collector", on_connect=[self._declare]
        )
        self.ready = asyncio.Event()
        self.error: str | None = None
        self._stopping = asyncio.Event()
        self._drains: list[_Drain] = []

    async def _declare(self, connection: object) -> None:
        await declare(connection, core_topology(self.pigeon))  # type: ignore[arg-type]

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Consume, reconnecting after broker loss, until :meth:`stop`."""
        retried = (*RETRYABLE, TopologyError, BrokerRefused)
        try:
            await supervise(
                self.connector,
                self._stopping,
                name="collector",
                connecting=lambda: backoff(
                    retry_if_exception_type(retried), self._stopping, self._unreachable
                ),
                gives_up_on=retried,
                start=self._consume,
                consuming=self._consuming,
                until_lost=self._until_lost,
            )
        finally:
            self.ready.clear()
            await self._teardown()
            await self.connector.close()
            log.info("collector.stopped")

    def _consuming(self) -> None:
        self.ready.set()
        self.error = None
        log.info(
            "collector.consuming",
            queues=[d.queue for d in self._drains],
            url=self.connector.masked_url,
        )

    async def _until_lost(self) -> None:
        await self._wait()
        self.ready.clear()
        await self._teardown()

    def _unreachable(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        # A refused login or vhost is a configuration error, but the UI still serves the
        # stored letters meanwhile: it is logged as an error and tried again, so a fixed
        # permission is picked up without a restart.
        refused = isinstance(error, BrokerRefused)
        self.error = str(error) if isinstance(error, TopologyError | BrokerRefused) else repr(error)
        if refused:
            log.error("collector.broker_refused", error=self.error)
            return
        event = (
            "collector.topology_mismatch"
            if isinstance(error, TopologyError)
            else ("collector.broker_unreachable")
        )
        log.warning(event, error=self.error, url=self.connector.masked_url)

    async def _consume(self) -> None:
        connection = await self.connector.get()
        self._drains = [
            _Drain(self, self.pigeon.dead_letter_queue, unrouted=False),
            _Drain(self, self.pigeon.unrouted_queue, unrouted=True),
        ]
        for drain in self._drains:
            drain.channel = await connection.channel(publisher_confirms=False)
            await drain.channel.set_qos(prefetch_count=self.settings.batch_size * 2)
            queue = await drain.channel.get_queue(drain.queue, ensure=False)
            drain.task = asyncio.create_task(drain.run(), name=f"letterthief-drain-{drain.queue}")
            drain.consumer = (queue, await queue.consume(drain.on_message))

    async def _wait(self) -> None:
        closed = asyncio.ensure_future(self.connector.closed.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        stopping.cancel()
        if not self._stopping.is_set():
            log.warning("collector.reconnecting")

    async def _teardown(self) -> None:
        """Stop consuming; a commit in progress may finish, anything unacked is redelivered."""
        drains, self._drains = self._drains, []
        for drain in drains:
            if drain.consumer is not None:
                queue, tag = drain.consumer
                with contextlib.suppress(Exception):
                    await queue.cancel(tag)
        for drain in drains:
            if drain.task is not None:
                drain.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await drain.task
            if drain.channel is not None and not drain.channel.is_closed:
                with contextlib.suppress(Exception):
                    await drain.channel.close()

    async def commit(
        self, drain: _Drain, batch: list[tuple[AbstractIncomingMessage, parse.Received]]
    ) -> None:
        """Store ``batch`` (retrying while the database is away), then ack it at once."""
        delay = 0.5
        while True:
            try:
                stored = await self.store.ingest([r for _, r in batch])
                break
            except Exception as exc:
                self.metrics.store_errors.inc()
                log.error(
                    "collector.store_failed",
                    queue=drain.queue,
                    letters=len(batch),
                    error=repr(exc),
                    retry_in=delay,
                    note="messages stay unacked in RabbitMQ until the database is back",
                )
                if drain.channel is None or drain.channel.is_closed:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        last = batch[-1][0]
        try:
            await last.ack(multiple=True)
        except Exception as exc:
            log.warning(
                "collector.ack_lost",
                queue=drain.queue,
                letters=len(batch),
                error=repr(exc),
                note="the redelivered copies are recognised and not counted twice",
            )
        try:
            self._record(drain, batch, stored)
        except Exception as exc:  # bookkeeping must never stop collection
            log.error("collector.record_failed", error=repr(exc))

    def _record(
        self,
        drain: _Drain,
        batch: list[tuple[AbstractIncomingMessage, parse.Received]],
        stored: list[Stored],
    ) -> None:
        now = datetime.now(UTC)
        self.metrics.collected.labels("unrouted" if drain.unrouted else "dead-letter").inc(
            len(stored)
        )
        self.metrics.last_commit.set(time.time())
        failed = [s.failed_at for s in stored if s.failed_at is not None]
        if failed:
            self.metrics.lag.set(max(0.0, (now - max(failed)).total_seconds()))
        for s in stored[:20]:
            log.info(
                "letter.stored",
                letter_id=s.letter_id,
                queue=s.queue,
                event_name=s.event,
                reason=s.reason,
                exception_type=s.exception_type,
            )
        if len(stored) > 20:
            log.info("letters.stored", queue=drain.queue, count=len(stored))
        if self.on_stored is not None and stored:
            try:
                self.on_stored(stored)
            except Exception as exc:
                log.error("collector.on_stored_failed", error=repr(exc))
