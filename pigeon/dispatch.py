"""Confirmed publishing, and the sync bridge for code that is not async.

``dispatch_async`` returns only after the broker confirmed the message
(persistent, publisher confirms). A broker outage is retried with exponential
backoff and jitter until ``PIGEON_DISPATCH_TIMEOUT``, then :class:`DispatchError`
is raised: an event is never dropped silently.

The sync ``dispatch`` is a thin bridge: it runs the async one on a background
event-loop thread owned by this process (a new one after ``fork()``), so it is
safe from many threads, Django/Flask views and forked workers.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar, Unpack, cast

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

from pigeon import headers as h
from pigeon.connection import Connector
from pigeon.errors import BrokerRefused, DispatchError, DispatchManyError
from pigeon.events import Event, encode_payload, validate_event_name
from pigeon.frames import short_string
from pigeon.logs import get_logger
from pigeon.messages import DISPATCH_OPTIONS, DispatchOptions, Outgoing
from pigeon.publishes import Publishes
from pigeon.tables import check_headers

__all__ = [  # Outgoing lives in pigeon.messages; this path still works
    "RETRYABLE",
    "Bridge",
    "Outgoing",
    "Publisher",
    "bridge",
    "build_outgoing",
    "on_bridge_shutdown",
]

log = get_logger("pigeon")
T = TypeVar("T")

RETRYABLE = (AMQPError, ConnectionError, OSError, TimeoutError, ChannelInvalidStateError)
"""Errors a later try can cure. A returned (unroutable) mandatory message is not one of
them: :class:`aio_pika.exceptions.PublishError` is raised at once, wrapped in DispatchError."""


NODE_ATTEMPT_TIMEOUT = 5.0
"""With several nodes in ``PIGEON_URL``: seconds one publish may wait for its confirm before
its node is given up (a hung or partitioned node answers nothing, and the connection's
heartbeat would notice only after a minute) and the publish is tried again on the next node."""


def build_outgoing(
    exchange: str,
    service: str | None,
    event: Event | str,
    payload: Mapping[str, Any] | None,
    **options: Unpack[DispatchOptions],
) -> Outgoing:
    """Turn a typed event or a name + payload into the documented wire format.

    ``service`` is the ``app_id``. Raises ``TypeError`` for a keyword that is
    not one of :class:`~pigeon.messages.DispatchOptions`.
    """
    unknown = options.keys() - DISPATCH_OPTIONS
    if unknown:
        raise TypeError(
            f"dispatch() got unexpected keyword arguments {', '.join(sorted(unknown))}; "
            f"it takes {', '.join(sorted(DISPATCH_OPTIONS))}"
        )
    if isinstance(event, Event):
        if payload is not None:
            raise TypeError("dispatch(event) takes no payload: the event is the payload")
        name = type(event).event_name()
        body = event.to_json()
        version: int | None = type(event).__event_version__
    else:
        name = validate_event_name(event)
        body = encode_payload(payload if payload is not None else {})
        version = None
    message_id = options.get("message_id") or str(uuid.uuid4())
    if len(message_id) > 63:  # 4 bytes a character at most: 63 always fit in 255
        short_string(message_id, "the message id")  # else the correlation id is blamed
    out_headers = check_headers(options.get("headers"))
    causation_id = options.get("causation_id")
    if causation_id:
        out_headers[h.CAUSATION_ID] = causation_id
    if version is not None:
        out_headers.setdefault(h.EVENT_VERSION, version)
    return Outgoing(
        exchange=exchange,
        routing_key=name,
        body=body,
        message_id=message_id,
        event_name=name,
        headers=out_headers,
        correlation_id=options.get("correlation_id") or message_id,
        app_id=service,
        timestamp=datetime.now(UTC),
    )


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


class Bridge:
    """A daemon thread running an event loop, so sync code can call async dispatch."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="pigeon-dispatch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the bridge loop and block until it is done."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("sync dispatch called from the dispatch thread itself")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self, cleanup: Coroutine[Any, Any, None] | None = None, timeout: float = 5.0) -> None:
        if cleanup is not None:
            try:
                asyncio.run_coroutine_threadsafe(cleanup, self.loop).result(timeout)
            except Exception as exc:
                log.debug("dispatch.bridge_cleanup_failed", error=repr(exc))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


_bridge: Bridge | None = None
_bridge_lock = threading.Lock()
_shutdown_hooks: list[Callable[[asyncio.AbstractEventLoop], Coroutine[Any, Any, None]]] = []


def on_bridge_shutdown(
    hook: Callable[[asyncio.AbstractEventLoop], Coroutine[Any, Any, None]],
) -> None:
    """Run ``await hook(loop)`` on the bridge's loop when the interpreter exits.

    The app registers the closing of its connections here, so this module,
    below the app, never imports it.
    """
    if hook not in _shutdown_hooks:
        _shutdown_hooks.append(hook)


def _after_fork() -> None:
    global _bridge, _bridge_lock
    _bridge = None
    _bridge_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def bridge() -> Bridge:
    """This process's bridge, started on first use."""
    global _bridge
    current = _bridge
    if current is not None and current.pid == os.getpid():
        return current
    with _bridge_lock:
        if _bridge is None or _bridge.pid != os.getpid():
            _bridge = Bridge()
            atexit.register(_shutdown_bridge, _bridge)
        return _bridge


def _shutdown_bridge(b: Bridge) -> None:
    if b.pid != os.getpid():
        return
    b.stop(_run_shutdown_hooks(b.loop))


async def _run_shutdown_hooks(loop: asyncio.AbstractEventLoop) -> None:
    for hook in list(_shutdown_hooks):
        await hook(loop)
