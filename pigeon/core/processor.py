"""One message through one listener: decode, claim, handle, decide.

This module knows nothing about AMQP. The worker turns an incoming message
into a :class:`Delivery`, asks a :class:`Processor` for the :class:`Outcome`,
and then settles it on the broker (ack, retry copy, dead letter). The testing
toolkit runs the very same processor without a broker.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import Executor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pigeon import headers as h
from pigeon.core.listener import Context, Listener
from pigeon.core.messages import Outcome, OutcomeKind
from pigeon.core.pipeline import chain
from pigeon.deadletter import dead_letter_headers
from pigeon.errors import HandlerTimeout, InvalidMessage
from pigeon.events import Event
from pigeon.headers import Reason
from pigeon.idempotency.base import ClaimState
from pigeon.idempotency.lease import Renewal
from pigeon.idempotency.owner import holder_is_dead
from pigeon.logs import get_logger
from pigeon.retry import Reject, RetryLater, tier_delay
from pigeon.tables import repair_decoded

if TYPE_CHECKING:
    from pigeon.idempotency.base import Claim, IdempotencyStore

__all__ = [  # Outcome, Renewal and the two errors lived here first; these paths still work
    "Delivery",
    "HandlerTimeout",
    "InvalidMessage",
    "Outcome",
    "OutcomeKind",
    "Processor",
    "Renewal",
]

log = get_logger("pigeon")


class NotStarted(Exception):
    """The handler was not started (the worker is stopping); the message goes back unhandled.

    Raised by the ``limit`` given to :meth:`Processor.process` instead of
    admitting a handler; the claim is released, so the next consumer takes the
    message at once.
    """


@dataclass(slots=True)
class Delivery:
    """A message as middleware and handlers see it; ``payload`` is set once decoded."""

    listener: Listener
    body: bytes
    event_name: str
    message_id: str
    headers: dict[str, Any]
    correlation_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    app_id: str | None = None
    timestamp: datetime | None = None
    redelivered: bool = False
    attempt: int = 1
    has_message_id: bool = True
    payload: Event | dict[str, Any] | None = None
    context: Context | None = None
    handled: bool = False
    store: IdempotencyStore | None = None
    undecodable: list[str] = field(default_factory=list)
    raw_properties: bytes = b""
    duplicate: bool = False

    @property
    def key(self) -> str:
        """The idempotency key: claims, done marks and recorded outcomes use it."""
        key = f"{self.listener.queue}:{self.message_id}"
        return key.replace("\x00", "\\u0000")  # a NUL id would fail PostgreSQL's whole batch

    @classmethod
    def create(
        cls,
        listener: Listener,
        body: bytes,
        *,
        event_name: str,
        message_id: str | None,
        headers: Mapping[str, Any] | None,
        **properties: Any,
    ) -> Delivery:
        raw = repair_decoded(dict(headers)) if headers else {}
        attempt = raw.get(h.ATTEMPT, 1)
        return cls(
            listener,
            body,
            event_name,
            message_id or str(uuid.uuid4()),
            raw,
            attempt=attempt if isinstance(attempt, int) and attempt > 0 else 1,
            has_message_id=bool(message_id),
            **properties,
        )

    @property
    def causation_id(self) -> str | None:
        value = self.headers.get(h.CAUSATION_ID)
        return value if isinstance(value, str) else None


async def _settled(store: IdempotencyStore, delivery: Delivery) -> bool:
    """Whether the outcome of this very try was published already, so it must not run again.

    Either the process that published it died before its ack (a redelivery), or
    it died between confirming a retry copy and recording that outcome, and the
    redelivered original published a second copy of the same attempt.
    """
    try:
        settled = await store.recorded_outcome(delivery.key)
    except Exception as exc:  # unknown: run it, as before outcomes were recorded
        log.warning("idempotency.store_failed", key=delivery.key, error=repr(exc))
        return False
    return settled is not None and delivery.attempt <= settled


def _not_awaitable(listener: Listener, result: object) -> None:
    """A plain ``def`` that returned a coroutine ran nothing: a failure, never "handled"."""
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError(
            f"listener {listener.name} is a plain def that returned {type(result).__name__}; "
            "nothing awaited it: declare the handler async def"
        )


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class Processor:
    """Runs deliveries through one listener with its middleware, retry policy and store.

    Built once per listener, so the middleware chain is composed once, not
    per message.
    """

    def __init__(
        self,
        listener: Listener,
        *,
        store: IdempotencyStore | None,
        executor: Executor | None = None,
        max_body_bytes: int,
    ) -> None:
        self.listener = listener
        # a listener with an outbox has its inbox instead of the idempotency store
        self.store = store if listener.idempotent and listener.outbox is None else None
        self.lock_store = store
        self.executor = executor
        self.max_body_bytes = listener.max_body_bytes or max_body_bytes
        middleware = listener.middleware
        if middleware is None:
            middleware = listener.app.middleware
        self._call = chain(middleware, self._invoke)

    async def process(
        self, delivery: Delivery, limit: AbstractAsyncContextManager[Any] | None = None
    ) -> Outcome:
        """Decide the fate of ``delivery``. Never raises, except on cancellation and the
        :class:`NotStarted` that ``limit`` may raise instead of admitting the handler.

        ``limit`` bounds the handlers running at once (``--concurrency``); it
        is held around the middleware and the handler only. Decoding and the
        idempotency claim and done mark run outside it, so a store that
        group-commits (SQLite, PostgreSQL, Redis pipelines) gets every
        prefetched message's call into one round, not only the running ones'.
        """
        delivery.store = self.lock_store
        store = self.store if delivery.has_message_id else None
        again = delivery.redelivered or delivery.attempt > 1  # a copy may be a duplicate one
        if store is not None and again and await _settled(store, delivery):
            return Outcome(OutcomeKind.DUPLICATE, delivery.attempt)
        try:
            delivery.payload = self.decode(delivery)
        except InvalidMessage as exc:
            return self._dead(delivery, exc.reason, exc, delivery.attempt)
        except Exception as exc:  # a body no decoder expected: never leave it unsettled
            return self._dead(delivery, Reason.INVALID_PAYLOAD, exc, delivery.attempt)
        if store is None:
            return await self._limited(delivery, limit)
        key = delivery.key
        lease = self.listener.claim_lease
        try:
            claim = await self._claim(store, key, lease)
        except Exception as exc:  # the store is down: fail this try, keep the message
            return await self._failed(delivery, delivery.attempt, exc)
        if claim.token is None:
            return Outcome(OutcomeKind.DUPLICATE, delivery.attempt)
        renewal = Renewal(store, key, claim.token, lease)
        try:
            outcome = await self._limited(delivery, limit)
        except BaseException:
            renewal.stop()
            await asyncio.shield(self._settle_claim(store, key, claim.token, released=True))
            raise
        renewal.stop()
        failed = outcome.kind is not OutcomeKind.ACKED
        await self._settle_claim(store, key, claim.token, released=failed)
        return outcome

    async def _limited(
        self, delivery: Delivery, limit: AbstractAsyncContextManager[Any] | None
    ) -> Outcome:
        if limit is None:
            return await self._attempts(delivery)
        async with limit:
            return await self._attempts(delivery)

    async def _claim(self, store: IdempotencyStore, key: str, lease: float) -> Claim:
        """Claim ``key``; while another delivery holds it, wait for it to finish or expire.

        Waiting (rather than re-queueing a copy) keeps the broker's delivery
        count intact, so a message that crashes every process that takes it
        still reaches ``x-delivery-limit`` and is dead-lettered. A holder on
        this host that provably died (its pid is gone or reused) is not waited
        for: its claim is released at once. Waiting holds no concurrency slot
        (see :meth:`process`).
        """
        while True:
            claim = await store.claim(key, lease)
            if claim.state is not ClaimState.IN_PROGRESS:
                return claim
            if claim.holder is not None and holder_is_dead(claim.holder):
                log.warning("idempotency.dead_holder_released", key=key, holder=claim.holder)
                await store.release(key, claim.holder)
                continue
            await asyncio.sleep(min(max(claim.retry_after, 0.05), lease / 3, 1.0))

    async def _settle_claim(
        self, store: IdempotencyStore, key: str, token: str, *, released: bool
    ) -> None:
        try:
            if released:
                await store.release(key, token)
            else:
                await store.done(key, token)
        except Exception as exc:
            log.error("idempotency.store_failed", key=key, error=repr(exc), released=released)

    def decode(self, delivery: Delivery) -> Event | dict[str, Any]:
        """The payload as the handler wants it; raises :class:`InvalidMessage`."""
        if delivery.undecodable:
            raise InvalidMessage(
                Reason.UNDECODABLE,
                "the message's properties could not be decoded: " + "; ".join(delivery.undecodable),
            )
        if len(delivery.body) > self.max_body_bytes:
            raise InvalidMessage(
                Reason.BODY_TOO_LARGE,
                f"body is {len(delivery.body)} bytes; this listener accepts at most "
                f"{self.max_body_bytes} (max_body_bytes=)",
            )
        if not _is_json(delivery.content_type) or delivery.content_encoding not in (
            None,
            "",
            "identity",
            "utf-8",
        ):
            raise InvalidMessage(
                Reason.UNSUPPORTED_CONTENT_TYPE,
                f"content type {delivery.content_type!r} (encoding "
                f"{delivery.content_encoding!r}) is not JSON; pigeon events are application/json",
            )
        listener = self.listener
        if listener.wants_dict:
            try:
                data = json.loads(delivery.body)
            except (ValueError, RecursionError) as exc:
                raise InvalidMessage(
                    Reason.INVALID_PAYLOAD, f"body is not valid JSON: {exc}"
                ) from exc
            if not isinstance(data, dict):
                raise InvalidMessage(
                    Reason.INVALID_PAYLOAD, f"body is JSON {type(data).__name__}, not an object"
                )
            return data
        event_type = listener.resolve_type(delivery.event_name)
        if event_type is None:
            raise InvalidMessage(
                Reason.UNKNOWN_EVENT,
                f"no Event class is registered for {delivery.event_name!r}; import the module "
                "that defines it in the listener's app",
            )
        try:
            return event_type.model_validate_json(delivery.body)
        except ValidationError as exc:
            raise InvalidMessage(
                Reason.INVALID_PAYLOAD, f"payload does not match {event_type.__name__}: {exc}"
            ) from exc

    def _context(self, delivery: Delivery, attempt: int) -> Context:
        listener = self.listener
        return Context(
            app=listener.app,
            message_id=delivery.message_id,
            event_name=delivery.event_name,
            correlation_id=delivery.correlation_id,
            causation_id=delivery.causation_id,
            headers=delivery.headers,
            attempt=attempt,
            redelivered=delivery.redelivered,
            queue=listener.queue,
            listener=listener.name,
            loop=asyncio.get_running_loop(),
        )

    async def _attempts(self, delivery: Delivery) -> Outcome:
        attempt = delivery.attempt
        while True:
            delivery.context = self._context(delivery, attempt)
            delivery.handled = False
            try:
                await self._call(delivery)
            except Reject as exc:
                return self._dead(delivery, Reason.REJECTED, exc, attempt)
            except InvalidMessage as exc:
                return self._dead(delivery, exc.reason, exc, attempt)
            except RetryLater as exc:
                policy = self.listener.retry
                if exc.counts and attempt >= policy.attempts:
                    return await self._exhausted(delivery, attempt, exc)
                later = tier_delay(exc.delay, policy)
                next_attempt = attempt + 1 if exc.counts else attempt
                return Outcome(OutcomeKind.RETRIED, next_attempt, delay=later, error=exc)
            except (Exception, SystemExit) as exc:
                delay = self.listener.retry.next_delay(attempt)
                if delay is None:
                    return await self._exhausted(delivery, attempt, exc)
                if delay > 0:
                    return Outcome(OutcomeKind.RETRIED, attempt + 1, delay=delay, error=exc)
                delivery.context.log.warning("message.retry_now", error=repr(exc))
                attempt += 1
                continue
            if not delivery.handled:
                delivery.context.log.info("middleware.decided", note="call_next was not called")
            if delivery.duplicate:  # the inbox knew this message: the handler did not run
                return Outcome(OutcomeKind.DUPLICATE, attempt)
            return Outcome(OutcomeKind.ACKED, attempt)

    async def _failed(self, delivery: Delivery, attempt: int, exc: BaseException) -> Outcome:
        delay = self.listener.retry.next_delay(attempt)
        if delay is None:
            return await self._exhausted(delivery, attempt, exc)
        return Outcome(OutcomeKind.RETRIED, attempt + 1, delay=delay or 1.0, error=exc)

    async def _exhausted(self, delivery: Delivery, attempt: int, exc: BaseException) -> Outcome:
        fallback = self.listener.fallback_handler
        if fallback is not None and delivery.payload is not None:
            ctx = delivery.context or self._context(delivery, attempt)
            try:
                result = fallback(delivery.payload, ctx, exc)
                if asyncio.iscoroutine(result):
                    await result
            except Exception as fallback_error:
                ctx.log.error("fallback.failed", error=repr(fallback_error))
        reason = Reason.TIMEOUT if isinstance(exc, HandlerTimeout) else Reason.HANDLER_ERROR
        return self._dead(delivery, reason, exc, attempt)

    def _dead(self, delivery: Delivery, reason: str, exc: BaseException, attempt: int) -> Outcome:
        listener = self.listener
        headers = dead_letter_headers(
            delivery.headers,
            reason=reason,
            error=exc,
            queue=listener.queue,
            listener=listener.name,
            attempts=attempt,
            service=listener.app.service,
        )
        if delivery.raw_properties:
            headers[h.UNDECODABLE] = bytearray(delivery.raw_properties)
        return Outcome(
            OutcomeKind.DEAD_LETTERED, attempt, reason=reason, error=exc, headers=headers
        )

    async def _invoke(self, delivery: Delivery) -> None:
        """The innermost step of the middleware chain: the handler, under its timeout."""
        delivery.handled = True
        listener = self.listener
        args: tuple[Any, ...] = (delivery.payload,)
        if listener.takes_context:
            args = (
                (delivery.context, delivery.payload)
                if listener.context_first
                else (delivery.payload, delivery.context)
            )
        timeout = listener.timeout
        try:
            async with asyncio.timeout(timeout) as scope:
                if listener.outbox is not None:
                    await self._invoke_in_transaction(delivery, args)
                elif listener.is_async:
                    await listener.handler(*args)
                else:
                    loop = asyncio.get_running_loop()
                    call = functools.partial(
                        contextvars.copy_context().run, listener.handler, *args
                    )
                    _not_awaitable(listener, await loop.run_in_executor(self.executor, call))
        except TimeoutError as exc:
            if not scope.expired():
                raise
            raise HandlerTimeout(
                f"{listener.name} ran longer than its timeout of {timeout:g}s and was cancelled"
            ) from exc

    async def _invoke_in_transaction(self, delivery: Delivery, args: tuple[Any, ...]) -> None:
        """The handler inside the inbox transaction of its listener's outbox."""
        listener, ctx, outbox = self.listener, delivery.context, self.listener.outbox
        assert outbox is not None
        assert ctx is not None
        if listener.is_async:
            ran = await outbox.run_async(ctx, listener.handler, *args)
        else:  # a thread cannot be stopped: past the timeout, its commit becomes a rollback
            expired = threading.Event()

            def guarded(*handler_args: Any) -> None:
                _not_awaitable(listener, listener.handler(*handler_args))
                if expired.is_set():
                    raise HandlerTimeout(f"{listener.name} timed out: its transaction rolls back")

            call = functools.partial(
                contextvars.copy_context().run, outbox.run_sync, ctx, guarded, *args
            )
            try:
                ran = await asyncio.get_running_loop().run_in_executor(self.executor, call)
            except asyncio.CancelledError:
                expired.set()
                raise
        delivery.duplicate = not ran
