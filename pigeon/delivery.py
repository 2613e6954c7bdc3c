"""One message through one listener: decode, claim, handle, decide.

This module knows nothing about AMQP. The worker turns an incoming message
into a :class:`Delivery`, asks a :class:`Processor` for the :class:`Outcome`,
and then settles it on the broker (ack, retry copy, dead letter). The testing
toolkit runs the very same processor without a broker.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import json
import uuid
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import ValidationError

from pigeon import headers as h
from pigeon.deadletter import dead_letter_headers
from pigeon.events import Event
from pigeon.headers import Reason
from pigeon.idempotency.base import ClaimState
from pigeon.listener import Context, Listener
from pigeon.middleware import chain
from pigeon.retry import Reject, RetryLater, tier_delay

if TYPE_CHECKING:
    from pigeon.idempotency import Claim, IdempotencyStore

log = structlog.get_logger("pigeon")


class OutcomeKind(enum.StrEnum):
    ACKED = "acked"
    RETRIED = "retried"
    DEAD_LETTERED = "dead_lettered"
    DUPLICATE = "duplicate"


@dataclass(slots=True)
class Outcome:
    """What happened to a delivery, and what the broker must be told."""

    kind: OutcomeKind
    attempt: int
    delay: float | None = None
    reason: str | None = None
    error: BaseException | None = None
    headers: dict[str, Any] = field(default_factory=dict)

    @property
    def acked(self) -> bool:
        return self.kind in (OutcomeKind.ACKED, OutcomeKind.DUPLICATE)

    @property
    def retried(self) -> bool:
        return self.kind is OutcomeKind.RETRIED

    @property
    def dead_lettered(self) -> bool:
        return self.kind is OutcomeKind.DEAD_LETTERED


class HandlerTimeout(Exception):
    """The handler ran past its listener's ``timeout=`` and was cancelled."""


class InvalidMessage(Exception):
    """The message cannot be handled by any retry: wrong type, size or schema."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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
    duplicate: bool = False

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
        raw = dict(headers or {})
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


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class Renewal:
    """Extends a claim every third of its lease while the handler runs.

    Most handlers finish well within a third of the lease, so nothing but a
    timer is created until a renewal is actually due.
    """

    __slots__ = ("_handle", "_task", "key", "lease", "store", "token")

    def __init__(self, store: IdempotencyStore, key: str, token: str, lease: float) -> None:
        self.store, self.key, self.token, self.lease = store, key, token, lease
        self._task: asyncio.Task[None] | None = None
        self._handle = asyncio.get_running_loop().call_later(lease / 3, self._start)

    def _start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.store.extend(self.key, self.token, self.lease)
            except Exception as exc:
                log.warning("idempotency.renew_failed", key=self.key, error=repr(exc))
            await asyncio.sleep(self.lease / 3)

    def stop(self) -> None:
        self._handle.cancel()
        if self._task is not None:
            self._task.cancel()


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
        self.abandoned_threads = 0

    async def process(self, delivery: Delivery) -> Outcome:
        """Decide the fate of ``delivery``. Never raises, except on cancellation."""
        delivery.store = self.lock_store
        try:
            delivery.payload = self.decode(delivery)
        except InvalidMessage as exc:
            return self._dead(delivery, exc.reason, exc, delivery.attempt)
        store = self.store if delivery.has_message_id else None
        if store is None:
            return await self._attempts(delivery)
        key = f"{self.listener.queue}:{delivery.message_id}"
        lease = self.listener.claim_lease
        try:
            claim = await self._claim(store, key, lease)
        except Exception as exc:  # the store is down: fail this try, keep the message
            return await self._failed(delivery, delivery.attempt, exc)
        if claim.token is None:
            return Outcome(OutcomeKind.DUPLICATE, delivery.attempt)
        renewal = Renewal(store, key, claim.token, lease)
        try:
            outcome = await self._attempts(delivery)
        except BaseException:
            renewal.stop()
            await asyncio.shield(self._settle_claim(store, key, claim.token, released=True))
            raise
        renewal.stop()
        failed = outcome.kind is not OutcomeKind.ACKED
        await self._settle_claim(store, key, claim.token, released=failed)
        return outcome

    async def _claim(self, store: IdempotencyStore, key: str, lease: float) -> Claim:
        """Claim ``key``; while another delivery holds it, wait for it to finish or expire.

        Waiting (rather than re-queueing a copy) keeps the broker's delivery
        count intact, so a message that crashes every process that takes it
        still reaches ``x-delivery-limit`` and is dead-lettered.
        """
        while True:
            claim = await store.claim(key, lease)
            if claim.state is not ClaimState.IN_PROGRESS:
                return claim
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
            except ValueError as exc:
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
        return Outcome(
            OutcomeKind.DEAD_LETTERED, attempt, reason=reason, error=exc, headers=headers
        )

    async def _invoke(self, delivery: Delivery) -> None:
        """The innermost step of the middleware chain: the handler, under its timeout."""
        delivery.handled = True
        listener = self.listener
        args: tuple[Any, ...] = (delivery.payload,)
        if listener.takes_context:
            args = (delivery.payload, delivery.context)
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
                    await loop.run_in_executor(self.executor, call)
        except TimeoutError as exc:
            if not scope.expired():
                raise
            if not listener.is_async:
                self.abandoned_threads += 1
            raise HandlerTimeout(
                f"{listener.name} ran longer than its timeout of {timeout:g}s and was cancelled"
            ) from exc

    async def _invoke_in_transaction(self, delivery: Delivery, args: tuple[Any, ...]) -> None:
        """The handler inside the inbox transaction of its listener's outbox."""
        from pigeon.outbox import inbox

        listener, ctx = self.listener, delivery.context
        assert listener.outbox is not None
        assert ctx is not None
        if listener.is_async:
            ran = await inbox.run_async(listener.outbox, ctx, listener.handler, *args)
        else:
            call = functools.partial(
                contextvars.copy_context().run,
                inbox.run_sync,
                listener.outbox,
                ctx,
                listener.handler,
                *args,
            )
            ran = await asyncio.get_running_loop().run_in_executor(self.executor, call)
        delivery.duplicate = not ran
