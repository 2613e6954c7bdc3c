"""Try again: publish a letter back to the one queue it failed in.

The replay goes through the default exchange with routing key = the
original queue, so only the service that failed gets it, not every
subscriber of the event. It keeps the message id and the original
properties (``type`` = event name, which pigeon listeners read first), drops
the headers that describe the failure and adds ``x-pigeon-replay-of`` /
``x-pigeon-replayed-by``. The letter is marked ``retried`` only after the
broker confirmed the publish and did not return it (``mandatory``); a
missing queue is an error the user sees and the letter stays open.
Bulk retries publish at most ``LETTERTHIEF_REPLAY_BATCH_SIZE`` at once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, DeliveryMode
from aiormq.exceptions import PublishError

from letterthief import parse
from letterthief.metrics import Metrics
from letterthief.models import Letter, Status
from letterthief.store import Store
from pigeon import headers as h
from pigeon.connection import Connector
from pigeon.logs import get_logger
from pigeon.settings import Settings

log = get_logger("letterthief")


class ReplayError(Exception):
    """A replay the broker did not accept; the message says why and what to do."""


class LetterNotFound(ReplayError):
    pass


class NotRetryable(ReplayError):
    """The letter is not open (already retried or archived)."""


class InvalidBody(ReplayError):
    """An edited body that does not fit the letter's content type."""


class QueueMissing(ReplayError):
    """The broker returned the replay: the original queue is gone."""


class BrokerUnavailable(ReplayError):
    """The broker did not confirm the replay (down, or refused it)."""


@dataclass
class Job:
    """Progress of a bulk action, shown by the UI while it runs."""

    id: str
    action: str
    actor: str
    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    errors: dict[int, str] = field(default_factory=dict)
    finished: bool = False
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def processed(self) -> int:
        return self.done + self.failed + self.skipped

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "action": self.action,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "skipped": self.skipped,
            "finished": self.finished,
            "errors": {str(k): v for k, v in list(self.errors.items())[:100]},
        }


class Jobs:
    """The last bulk actions of this process (kept in memory, newest 100)."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def new(self, action: str, actor: str, total: int) -> Job:
        job = Job(uuid.uuid4().hex[:12], action, actor, total)
        self.jobs[job.id] = job
        while len(self.jobs) > 100:
            self.jobs.pop(next(iter(self.jobs)))
        return job

    def run(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def check_body(letter: Letter, body: str) -> bytes:
    """The edited body as bytes; JSON content must parse (raises :class:`InvalidBody`)."""
    if parse.is_json_type(letter.content_type):
        try:
            json.loads(body)
        except ValueError as exc:
            raise InvalidBody(
                f"the edited body is not valid JSON ({exc}); the letter's content type is "
                f"{letter.content_type or 'application/json'}, so listeners would reject it"
            ) from exc
    return body.encode("utf-8")


def replay_message(letter: Letter, actor: str, body: bytes | None = None) -> aio_pika.Message:
    """The message a replay publishes: original properties, failure headers removed."""
    props = parse.from_json(letter.properties)
    headers = {
        k: v for k, v in parse.from_json(letter.headers).items() if not parse.is_failure_header(k)
    }
    headers[h.REPLAY_OF] = str(letter.id)
    headers[h.REPLAYED_BY] = actor
    timestamp = props.get("timestamp")
    return aio_pika.Message(
        letter.body if body is None else body,
        headers=headers,
        content_type=props.get("content_type"),
        content_encoding=props.get("content_encoding"),
        delivery_mode=DeliveryMode(props.get("delivery_mode") or DeliveryMode.PERSISTENT),
        priority=props.get("priority"),
        correlation_id=props.get("correlation_id"),
        reply_to=props.get("reply_to"),
        message_id=letter.message_id,
        timestamp=timestamp if isinstance(timestamp, datetime) else None,
        type=letter.event or props.get("type"),
        app_id=props.get("app_id"),
    )


def target(letter: Letter) -> tuple[str, str]:
    """(exchange, routing key): the original queue, or the original route of an unrouted event."""
    if letter.source == parse.UNROUTED:
        return letter.exchange, letter.routing_key
    return "", letter.queue


class Replayer:
    """Publishes replays on its own confirmed channel."""

    def __init__(
        self,
        store: Store,
        pigeon: Settings,
        *,
        batch_size: int = 100,
        timeout: float = 10.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.pigeon = pigeon
        self.batch_size = batch_size
        self.timeout = timeout
        self.metrics = metrics or Metrics()
        self.connector = Connector.for_settings(pigeon, name="letterthief-replay")
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            await channel.close()
        await self.connector.close()

    async def _get_channel(self) -> AbstractChannel:
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                connection = await self.connector.get(timeout=self.timeout)
                self._channel = await connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
            return self._channel

    async def publish(
        self, letter: Letter, actor: str, body: bytes | None = None
    ) -> ReplayError | None:
        """Publish one replay and wait for the confirm; returns the error, or ``None``."""
        exchange_name, routing_key = target(letter)
        try:
            channel = await self._get_channel()
            exchange = (
                channel.default_exchange
                if exchange_name == ""
                else await channel.get_exchange(exchange_name, ensure=False)
            )
            await exchange.publish(
                replay_message(letter, actor, body),
                routing_key,
                mandatory=True,
                timeout=self.timeout,
            )
        except PublishError:
            where = (
                f"queue {routing_key}"
                if exchange_name == ""
                else (f"a queue bound to {exchange_name} for {routing_key!r}")
            )
            return QueueMissing(
                f"{where} does not exist, so the broker returned the message; the letter "
                "stays open. Start the service that owns the queue (it declares it) and try "
                "again, or archive the letter."
            )
        except Exception as exc:
            if self._channel is not None and self._channel.is_closed:
                self._channel = None
            if not self.connector.is_open:
                self.connector.invalidate()
            return BrokerUnavailable(
                f"the broker at {self.connector.masked_url} did not confirm the replay "
                f"({type(exc).__name__}: {exc}); the letter stays open, try again later"
            )
        return None

    async def retry(self, letter_id: int, actor: str, body: str | None = None) -> Letter:
        """Try one letter again (``body`` replaces the original); returns it as stored after."""
        letter = await self.store.get(letter_id)
        if letter is None:
            raise LetterNotFound(f"there is no letter {letter_id}")
        if letter.status != Status.OPEN:
            raise NotRetryable(
                f"letter {letter_id} is {letter.status}; only open letters are tried again "
                "(restore it first)"
            )
        edited = check_body(letter, body) if body is not None else None
        action = "edit-retry" if edited is not None else "retry"
        error = await self.publish(letter, actor, edited)
        if error is not None:
            self.metrics.replays.labels("failed").inc()
            await self.store.record_failures([(letter.id, str(error))], actor, action=action)
            log.warning(
                "letter.retry_failed", letter_id=letter.id, queue=letter.queue, error=str(error)
            )
            raise error
        self.metrics.replays.labels("ok").inc()
        await self.store.mark_retried(
            [(letter.id, letter.occurrences)], actor, action=action, body=edited
        )
        log.info(
            "letter.retried",
            letter_id=letter.id,
            queue=letter.queue,
            message_id=letter.message_id,
            actor=actor,
            edited=edited is not None,
        )
        after = await self.store.get(letter.id)
        assert after is not None
        return after

    async def retry_many(self, ids: Sequence[int], actor: str, job: Job) -> Job:
        """Try many letters again, ``batch_size`` in flight at a time; progress goes to ``job``."""
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), self.batch_size):
            chunk = unique[start : start + self.batch_size]
            letters = await self.store.get_many(chunk)
            found = {letter.id for letter in letters}
            job.skipped += len([i for i in chunk if i not in found])
            retryable = [letter for letter in letters if letter.status == Status.OPEN]
            job.skipped += len(letters) - len(retryable)
            errors = await asyncio.gather(*(self.publish(x, actor) for x in retryable))
            done = [(x.id, x.occurrences) for x, e in zip(retryable, errors, strict=True) if not e]
            failed = [(x.id, str(e)) for x, e in zip(retryable, errors, strict=True) if e]
            await self.store.mark_retried(done, actor)
            await self.store.record_failures(failed, actor)
            self.metrics.replays.labels("ok").inc(len(done))
            self.metrics.replays.labels("failed").inc(len(failed))
            job.done += len(done)
            job.failed += len(failed)
            job.errors.update(failed)
        job.finished = True
        log.info(
            "letters.retried",
            job=job.id,
            actor=actor,
            done=job.done,
            failed=job.failed,
            skipped=job.skipped,
        )
        return job
