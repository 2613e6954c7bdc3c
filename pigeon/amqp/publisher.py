"""Confirmed publishing: one cached confirm channel per connection.

``dispatch_async`` returns only after the broker confirmed the message
(persistent, publisher confirms). A broker outage is retried with exponential
backoff and jitter until ``PIGEON_DISPATCH_TIMEOUT``, then :class:`DispatchError`
is raised: an event is never dropped silently.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractChannel
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError, PublishError
from pamqp.commands import Basic
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    wait_exponential_jitter,
)

from pigeon.amqp.connection import Connector
from pigeon.amqp.publishes import Publishes
from pigeon.core.messages import Outgoing
from pigeon.errors import BrokerRefused, DispatchError, DispatchManyError
from pigeon.logs import get_logger

__all__ = ["NODE_ATTEMPT_TIMEOUT", "RETRYABLE", "Publisher"]

log = get_logger("pigeon")

RETRYABLE = (AMQPError, ConnectionError, OSError, TimeoutError, ChannelInvalidStateError)
"""Errors a later try can cure. A returned (unroutable) mandatory message is not one of
them: :class:`aio_pika.exceptions.PublishError` is raised at once, wrapped in DispatchError."""


NODE_ATTEMPT_TIMEOUT = 5.0
"""With several nodes in ``PIGEON_URL``: seconds one publish may wait for its confirm before
its node is given up (a hung or partitioned node answers nothing, and the connection's
heartbeat would notice only after a minute) and the publish is tried again on the next node."""


def _send_all(publishes: Publishes, part: list[Outgoing]) -> asyncio.Future[list[Any]]:
    """Send ``part``; one future for all their answers (a send that failed is one)."""
    answers: list[asyncio.Future[Any]] = []
    for out in part:
        try:
            answers.append(publishes.send(out))
        # a closed channel, or a message it cannot encode: publish() retries it or raises
        except Exception as exc:
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            answers.append(failed)
    return asyncio.gather(*answers, return_exceptions=True)


async def _unconfirmed(part: list[Outgoing], confirms: asyncio.Future[list[Any]]) -> list[Outgoing]:
    """The messages of ``part`` that the broker did not confirm."""
    results = await confirms
    return [out for out, result in zip(part, results, strict=True) if not _acked(result)]


class Publisher:
    """Publishes with confirms on one cached channel of one connection."""

    def __init__(self, connector: Connector, *, timeout: float) -> None:
        self.connector = connector
        self.timeout = timeout
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Future[None]] = set()  # channels a reset is closing
        self._writer: Publishes | None = None

    async def _publish_once(self, outgoing: Outgoing, timeout: float) -> None:
        """One try; a retryable failure resets the channel it happened on (if current)."""
        publishes: Publishes | None = None
        try:
            # asyncio.timeout() costs one timer handle; aio-pika's timeout= spawns a task.
            async with asyncio.timeout(timeout):
                publishes = await self._publishes()
                result = await publishes.send(outgoing)
        except PublishError:
            raise  # a return says nothing about the channel: others in flight on it stay
        except RETRYABLE as exc:
            self._reset(exc, publishes)
            raise
        if not _acked(result):
            raise DeliveryError(None, result)

    async def _publishes(self) -> Publishes:
        """The writer of the confirm channel: frames go straight to aiormq's write queue.

        One writer per channel (two would interleave their delivery tags), and
        none for a channel that is closing. Finding the channel closed raises
        ``ChannelInvalidStateError`` after forgetting it, so the caller's
        retry (with its backoff) opens the next one: the connection may be
        closing too, and a new channel on it would fail at once.
        """
        for _ in range(3):
            publishes = self._writer
            if publishes is not None:
                if publishes.usable:
                    return publishes
                error = ChannelInvalidStateError("the publishing channel closed")
                self._reset(error, publishes)
                raise error
            channel = self._channel
            if channel is None or channel.is_closed:
                async with self._lock:
                    channel = self._channel
                    if channel is None or channel.is_closed:
                        channel = self._channel = await self.connector.channel(confirms=True)
            underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
            if self._channel is channel and self._writer is None:
                self._writer = Publishes(underlay)
        raise ChannelInvalidStateError("no usable publishing channel: each one closed at once")

    async def publish(self, outgoing: Outgoing, *, timeout: float | None = None) -> str:
        """Publish and wait for the confirm; retry outages until ``timeout``, then raise.

        The deadline is kept: no try and no backoff sleep runs past it. The
        :class:`DispatchError` says the message may have been stored anyway.
        """
        limit = self.timeout if timeout is None else timeout
        try:
            return await self._publish_until(outgoing, limit)
        except BrokerRefused as exc:  # wrong credentials, vhost or TLS: no retry can cure it
            raise DispatchError(
                f"could not publish {outgoing.event_name} (message {outgoing.message_id}): {exc}"
            ) from exc

    async def _publish_until(self, outgoing: Outgoing, limit: float) -> str:
        deadline = time.monotonic() + limit
        try:
            await self._publish_once(outgoing, self._attempt_limit(limit))
            return outgoing.message_id
        except PublishError as exc:
            raise DispatchError(
                f"could not publish {outgoing.event_name} (message {outgoing.message_id}): "
                f"{_explain(exc)}"
            ) from exc
        except RETRYABLE as exc:  # retried below at once, then with backoff
            first = exc
            self._log_retry(outgoing, attempt=1, retry_in=0.0, error=exc)
        telling: BaseException = first  # a try cut short by the deadline says less
        try:
            async for attempt in AsyncRetrying(
                stop=lambda _: deadline - time.monotonic() < MIN_TRY,
                wait=_until(deadline),
                retry=retry_if_exception_type(RETRYABLE)
                & retry_if_not_exception_type(PublishError),
                reraise=True,
                before_sleep=self._before_sleep(outgoing),
            ):
                with attempt:
                    remaining = max(deadline - time.monotonic(), MIN_TRY)
                    try:
                        await self._publish_once(outgoing, self._attempt_limit(remaining))
                    except RETRYABLE as exc:
                        if not isinstance(exc, TimeoutError):
                            telling = exc
                        raise
        except RETRYABLE as exc:
            raise DispatchError(
                f"could not confirm {outgoing.event_name} (message {outgoing.message_id}) with "
                f"{self.connector.masked_url} within {limit:g}s: {_explain(telling)}. It may have "
                f"been stored; retry with the same message id ({outgoing.message_id})"
            ) from exc
        return outgoing.message_id

    def _attempt_limit(self, remaining: float) -> float:
        """How long one try may wait: capped when another node could answer instead."""
        if len(self.connector.urls) > 1:
            return min(remaining, NODE_ATTEMPT_TIMEOUT)
        return remaining

    async def publish_many(self, batch: list[Outgoing], *, chunk: int = 1000) -> list[str]:
        """Publish ``batch`` with its confirms pipelined; returns the message ids.

        The fast path hands frames straight to aiormq (no per-message aio-pika
        objects). It works in chunks of ``chunk`` messages and keeps two in
        flight: the next chunk is written while the broker still confirms the
        last, so the link never idles waiting for a chunk's final confirm. Any
        message that was not confirmed (a nack, a lost connection) goes through
        :meth:`publish`, with its retries: nothing is dropped silently. If any
        still fails, :class:`DispatchManyError` lists which ids were confirmed.
        """
        failed: list[Outgoing] = []
        in_flight: deque[tuple[list[Outgoing], asyncio.Future[list[Any]]]] = deque()
        for start in range(0, len(batch), chunk):
            part = batch[start : start + chunk]
            try:
                publishes = await self._publishes()
            except RETRYABLE:  # the channel is reset; publish() retries these with backoff
                failed.extend(part)
                continue
            except BrokerRefused as exc:
                raise DispatchError(f"could not publish {len(batch)} events: {exc}") from exc
            in_flight.append((part, _send_all(publishes, part)))
            if len(in_flight) > 1:
                failed.extend(await _unconfirmed(*in_flight.popleft()))
        while in_flight:
            failed.extend(await _unconfirmed(*in_flight.popleft()))
        errors: dict[str, Exception] = {}
        for out in failed:  # every one is tried; the errors are raised together after
            try:
                await self.publish(out)
            except Exception as exc:
                errors[out.message_id] = exc
        if errors:
            raise _batch_error(batch, errors)
        return [out.message_id for out in batch]

    def _forget_writer(self) -> None:
        """After a reset: nothing more goes to the old channel, even while it closes."""
        publishes, self._writer = self._writer, None
        if publishes is not None:
            publishes.close()

    def _reset(self, exc: BaseException, failed: Publishes | None = None) -> None:
        """Drop the channel after ``exc`` (raised on ``failed``'s channel, if known).

        An error from a channel already replaced leaves the current one alone.
        """
        if failed is not None and failed is not self._writer:
            return
        self._forget_writer()
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            closing = asyncio.ensure_future(channel.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        if not self.connector.is_open or isinstance(exc, ConnectionError | OSError):
            self.connector.invalidate()

    def _log_retry(
        self, outgoing: Outgoing, *, attempt: int, retry_in: float, error: BaseException | None
    ) -> None:
        """``attempt`` is the try that failed: 1 for the first."""
        log.warning(
            "dispatch.retrying",
            event_name=outgoing.event_name,
            message_id=outgoing.message_id,
            attempt=attempt,
            retry_in=round(retry_in, 3),
            error=repr(error),
            url=self.connector.masked_url,
        )

    def _before_sleep(self, outgoing: Outgoing) -> Any:
        def before_sleep(state: Any) -> None:
            # the first try ran before tenacity's loop: its attempt n is try n + 1
            self._log_retry(
                outgoing,
                attempt=state.attempt_number + 1,
                retry_in=state.upcoming_sleep,
                error=state.outcome.exception(),
            )

        return before_sleep

    async def close(self) -> None:
        """Close the channel, and wait (up to 5 s) for the ones earlier resets are closing."""
        self._forget_writer()
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            await channel.close()
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=5.0)


MIN_TRY = 0.05
"""Seconds: a retry with less time than this left before the deadline is not started."""


def _until(deadline: float) -> Any:
    """Exponential backoff with jitter, each sleep cut to end at ``deadline`` at the latest."""
    backoff = wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.5)

    def wait(state: Any) -> float:
        return max(0.0, min(backoff(state), deadline - time.monotonic()))

    return wait


def _batch_error(batch: list[Outgoing], errors: dict[str, Exception]) -> DispatchManyError:
    confirmed = [out.message_id for out in batch if out.message_id not in errors]
    unconfirmed = [out.message_id for out in batch if out.message_id in errors]
    first = next(iter(errors.values()))
    shown = ", ".join(unconfirmed[:20]) + (" …" if len(unconfirmed) > 20 else "")
    error = DispatchManyError(
        f"{len(unconfirmed)} of {len(batch)} events were not confirmed ({first}); "
        f"unconfirmed ids: {shown}. They may have been stored; retry them with the same "
        "message ids (the error's .unconfirmed); .confirmed lists the rest",
        confirmed=confirmed,
        unconfirmed=unconfirmed,
        errors=errors,
    )
    error.__cause__ = first
    return error


def _acked(result: object) -> bool:
    return isinstance(result, Basic.Ack)


def _explain(exc: BaseException) -> str:
    if isinstance(exc, PublishError):
        return (
            "the broker returned it as unroutable (no queue for routing key "
            f"{getattr(exc.message, 'routing_key', '?')!r}; declare the topology first)"
        )
    if isinstance(exc, DeliveryError):
        return (
            "the broker refused it (nack): a queue it routes to is full "
            "(x-overflow=reject-publish) or unavailable"
        )
    return f"{type(exc).__name__}: {exc}"
