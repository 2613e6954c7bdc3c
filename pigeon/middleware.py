"""Middleware: code that wraps every handler call (consume) or dispatch (publish).

A consume middleware is ``async def __call__(self, delivery, call_next)``; it
runs around the handler, inside the retry decision, so an exception it raises
is a failure of that message like any handler error. Middleware listed first
is outermost. A middleware may decide the outcome without calling
``call_next`` (that is logged).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any, Protocol

from pigeon import pipeline
from pigeon.errors import ConfigurationError, HandlerTimeout
from pigeon.idempotency import open_store
from pigeon.idempotency.base import ClaimState
from pigeon.idempotency.lease import Renewal
from pigeon.logs import get_logger
from pigeon.metrics import HANDLER_SECONDS, IN_FLIGHT
from pigeon.retry import RetryLater

if TYPE_CHECKING:
    from pigeon.delivery import Delivery
    from pigeon.idempotency.base import IdempotencyStore
    from pigeon.messages import Outgoing

CallNext = Callable[["Delivery"], Awaitable[None]]
PublishNext = Callable[["Outgoing"], Awaitable[str]]


class Middleware(Protocol):
    """Wraps the handling of one delivery."""

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None: ...


class PublishMiddleware(Protocol):
    """Wraps the publishing of one outgoing event; returns the message id."""

    async def __call__(self, outgoing: Outgoing, call_next: PublishNext) -> str: ...


chain = pipeline.chain
"""Compose consume middleware around the handler call; the first in the list runs first."""

publish_chain = pipeline.chain
"""Compose publish middleware around the confirmed publish (the same chain)."""


# -- built-ins -----------------------------------------------------------------------


class Logging:
    """Logs each handler call: ``handler.started`` (debug) and ``handler.finished`` with
    ``duration_ms`` and the error, if any. The worker's ``message.handled`` line (the
    final outcome) is logged either way."""

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
        ctx = delivery.context
        log = ctx.log if ctx is not None else get_logger("pigeon")
        log.debug("handler.started")
        started = time.perf_counter()
        try:
            await call_next(delivery)
        except BaseException as exc:
            log.warning(
                "handler.finished",
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                error=repr(exc),
            )
            raise
        log.info("handler.finished", duration_ms=round((time.perf_counter() - started) * 1000, 2))


class Timeout:
    """Cancels the rest of the chain after ``seconds``; the message then fails with
    reason ``timeout`` like a listener's own ``timeout=``."""

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ConfigurationError(f"Timeout(seconds) must be positive, got {seconds!r}")
        self.seconds = seconds

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
        try:
            async with asyncio.timeout(self.seconds) as scope:
                await call_next(delivery)
        except TimeoutError as exc:
            if not scope.expired():
                raise
            raise HandlerTimeout(
                f"{delivery.listener.name} ran longer than Timeout({self.seconds:g})"
            ) from exc


KeyFunc = Callable[[Any], Hashable]


class RateLimit:
    """At most ``n`` handler calls per ``per`` seconds (per ``key`` value when given).

    A message over the limit is not dropped and does not spin: it is postponed
    through the retry tiers (``RetryLater(counts=False)``, so it spends no
    attempt) until a slot is free. The window is kept in this process: with
    ``P`` listener processes the total rate is up to ``P * n``.
    """

    def __init__(self, n: int, per: float = 1.0, key: KeyFunc | None = None) -> None:
        if n < 1 or per <= 0:
            raise ConfigurationError(
                f"RateLimit needs n >= 1 and per > 0 (seconds), got n={n!r}, per={per!r}"
            )
        self.n, self.per, self.key = n, per, key
        self._calls: dict[Hashable, deque[float]] = {}
        self._sweep_at = 0.0

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
        bucket = self.key(delivery.payload) if self.key is not None else None
        now = time.monotonic()
        if now >= self._sweep_at:
            self._sweep(now)
        calls = self._calls.setdefault(bucket, deque())
        while calls and calls[0] <= now - self.per:
            calls.popleft()
        if len(calls) >= self.n:
            wait = calls[0] + self.per - now
            raise RetryLater(
                max(wait, 0.001), f"rate limit of {self.n}/{self.per:g}s", counts=False
            )
        calls.append(now)
        await call_next(delivery)

    def _sweep(self, now: float) -> None:
        """Forget the keys whose window is over: at most once per window, so the buckets
        are bounded by the keys seen in the last two windows, not by every key ever seen."""
        quiet = now - self.per
        for bucket in [b for b, calls in self._calls.items() if not calls or calls[-1] <= quiet]:
            del self._calls[bucket]
        self._sweep_at = now + self.per


class WithoutOverlapping:
    """No two handler calls for the same ``key(event)`` run at once, across processes.

    The lock is a lease in the listener's idempotency store: with Redis or
    PostgreSQL it holds across hosts, with SQLite across the processes of one
    host, with memory inside one process. The lease is renewed while the
    handler runs, so a crashed holder frees the key after ``lease`` seconds.
    A caller waits up to ``wait`` seconds, then postpones the message through
    the retry tiers without spending an attempt.
    """

    def __init__(
        self, key: KeyFunc, *, lease: float = 30.0, wait: float = 10.0, scope: str | None = None
    ) -> None:
        self.key, self.lease, self.wait, self.scope = key, lease, wait, scope
        self._fallback: IdempotencyStore | None = None

    async def _store(self, delivery: Delivery) -> IdempotencyStore:
        if delivery.store is not None:
            return delivery.store
        if self._fallback is None:
            self._fallback = open_store("memory://")
            await self._fallback.open()
        return self._fallback

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
        store = await self._store(delivery)
        scope = self.scope or delivery.listener.queue
        lock = f"lock:{scope}:{self.key(delivery.payload)}"
        deadline = time.monotonic() + self.wait
        while True:
            claim = await store.claim(lock, self.lease)
            if claim.state is ClaimState.CLAIMED and claim.token is not None:
                break
            if time.monotonic() >= deadline:
                raise RetryLater(1.0, f"{lock} is held by another handler", counts=False)
            await asyncio.sleep(min(max(claim.retry_after, 0.01), 0.2))
        renewal = Renewal(store, lock, claim.token, self.lease)
        try:
            await call_next(delivery)
        finally:
            renewal.stop()
            await asyncio.shield(store.release(lock, claim.token))


class Metrics:
    """Records ``pigeon_handler_duration_seconds{queue}`` and ``pigeon_in_flight{queue}``.

    It is in every app's middleware unless the app is given its own list
    (then add ``Metrics()`` to keep these two metrics). Outcome counts
    (``pigeon_messages_total``) are recorded by the worker regardless.
    """

    def __init__(self) -> None:
        self._children: dict[str, tuple[Any, Any]] = {}

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
        queue = delivery.listener.queue
        children = self._children.get(queue)
        if children is None:
            children = self._children[queue] = (
                IN_FLIGHT.labels(queue),
                HANDLER_SECONDS.labels(queue),
            )
        gauge, histogram = children
        gauge.inc()
        started = time.perf_counter()
        try:
            await call_next(delivery)
        finally:
            gauge.dec()
            histogram.observe(time.perf_counter() - started)
