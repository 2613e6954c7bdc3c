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

Each replay first claims its letter (open → retrying) so parallel clicks
send one copy; its target is checked (:func:`target`: the origin queue, never
``amq.*``, LetterThief's own queues or a retry tier) and the whole message is
built and encoded before anything is sent (:mod:`letterthief.message`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aio_pika.exceptions import PublishError

from letterthief import message, parse
from letterthief.metrics import Metrics
from letterthief.models import Letter, Status
from letterthief.store import Store
from pigeon.amqp import Connector, Publisher
from pigeon.errors import DispatchError
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


class NotReplayable(ReplayError):
    """The letter's origin is in doubt, or names a queue a replay must never reach (409)."""


class CannotEncode(InvalidBody):
    """A header or property of the letter that AMQP cannot carry (422, naming it)."""


def _missing(exchange: str, routing_key: str) -> QueueMissing:
    where = (
        f"queue {routing_key}"
        if exchange == ""
        else f"a queue bound to {exchange} for {routing_key!r}"
    )
    return QueueMissing(
        f"{where} does not exist, so the broker returned the message; the letter "
        "stays open. Start the service that owns the queue (it declares it) and try "
        "again, or archive the letter."
    )


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


def check_body(letter: Letter, body: str, limit: int = 1024 * 1024) -> bytes:
    """The edited body as bytes, at most ``limit`` of them; JSON content must parse.

    Raises :class:`InvalidBody` (422).
    """
    data = body.encode("utf-8", "surrogatepass")
    if len(data) > limit:
        raise InvalidBody(
            f"the edited body is {len(data)} bytes; LETTERTHIEF_MAX_EDIT_BYTES allows {limit}"
        )
    if parse.is_json_type(letter.content_type):
        try:
            json.loads(body)
        except (ValueError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise InvalidBody(
                f"the edited body is not valid JSON ({reason}); the letter's content type is "
                f"{letter.content_type or 'application/json'}, so listeners would reject it"
            ) from exc
    return data


def outcome(error: ReplayError) -> str:
    """The history's word for a replay that did not succeed: a broker that did not
    answer in time may still have delivered it, so that is not called failed."""
    return "unconfirmed" if isinstance(error, BrokerUnavailable) else "failed"


TIER = re.compile(r".+\.retry\.\d+m?s")


def target(letter: Letter, pigeon: Settings) -> tuple[str, str]:
    """(exchange, routing key) of the replay; raises :class:`NotReplayable`.

    A dead letter goes back to its origin queue (the routing key it was
    dead-lettered under) through the default exchange; an unrouted event to
    the events exchange under its event name. Never into ``amq.*`` queues,
    LetterThief's own queues or retry tiers, whatever a letter claims.
    """
    if letter.origin_problem:
        raise NotReplayable(f"{letter.origin_problem}. Archive it, or check who published it.")
    if letter.source == parse.UNROUTED:
        if letter.exchange != pigeon.exchange or not letter.routing_key:
            raise NotReplayable(
                f"this unrouted letter names exchange {letter.exchange!r} and routing key "
                f"{letter.routing_key!r}; only events of {pigeon.exchange} are replayed"
            )
        return letter.exchange, letter.routing_key
    queue = letter.queue
    if not queue:
        raise NotReplayable("the letter names no origin queue, so there is nowhere to send it")
    own = {pigeon.dead_letter_queue, pigeon.unrouted_queue}
    if queue.startswith("amq.") or queue in own or TIER.fullmatch(queue):
        raise NotReplayable(
            f"{queue!r} is a broker-named, LetterThief or retry-tier queue; a replay never "
            "goes there. Archive the letter."
        )
    return "", queue


class Replayer:
    """Publishes replays through pigeon's confirmed :class:`~pigeon.amqp.Publisher`.

    Each replay is built and encoded as a check before it is handed over
    (:func:`letterthief.message.build`), so a letter AMQP cannot carry is a
    422 naming the header and never touches the channel. After any other
    publish error the channel is dropped and the next replay opens a fresh
    one; a replay the broker confirmed is never recorded as failed.
    """

    def __init__(
        self,
        store: Store,
        pigeon: Settings,
        *,
        batch_size: int = 100,
        timeout: float = 10.0,
        metrics: Metrics | None = None,
        max_edit_bytes: int = 1024 * 1024,
    ) -> None:
        self.max_edit_bytes = max_edit_bytes
        self.store = store
        self.pigeon = pigeon
        self.batch_size = batch_size
        self.timeout = timeout
        self.metrics = metrics or Metrics()
        self.connector = Connector.for_settings(pigeon, name="letterthief-replay")
        self.publisher = Publisher(self.connector, timeout=timeout)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.publisher.close()
        await self.connector.close()

    async def publish(
        self, letter: Letter, actor: str, body: bytes | None = None
    ) -> ReplayError | None:
        """Publish one replay and wait for the confirm; returns the error, or ``None``."""
        try:
            exchange_name, routing_key = target(letter, self.pigeon)
        except NotReplayable as exc:
            return exc
        try:
            out = message.build(letter, actor, exchange_name, routing_key, body)
        except message.Unencodable as exc:
            return CannotEncode(str(exc))
        try:
            await self.publisher.publish(out, timeout=self.timeout)
        except DispatchError as exc:
            if isinstance(exc.__cause__, PublishError):
                return _missing(exchange_name, routing_key)
            return BrokerUnavailable(
                f"the broker at {self.connector.masked_url} did not confirm the replay within "
                f"{self.timeout:g}s ({exc.__cause__ or exc}); the letter stays open, try again"
            )
        except Exception as exc:  # nothing else may leave the channel in doubt: drop it
            log.exception("letter.replay_error", letter_id=letter.id, error=repr(exc))
            with contextlib.suppress(Exception):
                await self.publisher.close()
            return BrokerUnavailable(
                f"the replay failed ({type(exc).__name__}: {exc}); the letter stays open"
            )
        return None

    @property
    def stale_claim(self) -> timedelta:
        """How long a claim holds when its replay never finished (the process died)."""
        return timedelta(seconds=max(60.0, self.timeout * 6))

    async def _claim_one(self, letter_id: int) -> Letter:
        """Claim ``letter_id`` for this replay; raises when it is not there or not open."""
        letter = await self.store.get(letter_id)
        if letter is None:
            raise LetterNotFound(f"there is no letter {letter_id}")
        if await self.store.claim([letter_id], self.stale_claim):
            claimed = await self.store.get(letter_id)
            assert claimed is not None
            return claimed
        after = await self.store.get(letter_id)
        status = after.status if after is not None else letter.status
        if status == Status.RETRYING:
            raise NotRetryable(f"letter {letter_id} is already being retried")
        raise NotRetryable(
            f"letter {letter_id} is {status}; only open letters are tried again (restore it first)"
        )

    async def retry(self, letter_id: int, actor: str, body: str | None = None) -> Letter:
        """Try one letter again (``body`` replaces the original); returns it as stored after.

        The letter is claimed first (open → retrying): of parallel retries one
        publishes, the others raise :class:`NotRetryable` (409).
        """
        letter = await self.store.get(letter_id)
        if letter is not None and body is not None:
            check_body(letter, body, self.max_edit_bytes)
        letter = await self._claim_one(letter_id)
        edited = check_body(letter, body, self.max_edit_bytes) if body is not None else None
        action = "edit-retry" if edited is not None else "retry"
        error = await self.publish(letter, actor, edited)
        if error is not None:
            await self.store.release([letter.id])
            self.metrics.replays.labels("failed").inc()
            await self.store.record_failures(
                [(letter.id, str(error))], actor, action=action, result=outcome(error)
            )
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
            retryable = await self.store.get_many(await self.store.claim(chunk, self.stale_claim))
            job.skipped += len(chunk) - len(retryable)
            errors = await asyncio.gather(*(self.publish(x, actor) for x in retryable))
            done = [(x.id, x.occurrences) for x, e in zip(retryable, errors, strict=True) if not e]
            failed = [(x.id, e) for x, e in zip(retryable, errors, strict=True) if e]
            await self.store.release([i for i, _ in failed])
            await self.store.mark_retried(done, actor)
            for result in ("failed", "unconfirmed"):
                await self.store.record_failures(
                    [(i, str(e)) for i, e in failed if outcome(e) == result], actor, result=result
                )
            self.metrics.replays.labels("ok").inc(len(done))
            self.metrics.replays.labels("failed").inc(len(failed))
            job.done += len(done)
            job.failed += len(failed)
            job.errors.update((i, str(e)) for i, e in failed)
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
