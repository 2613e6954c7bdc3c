"""``WithoutOverlapping``: one handler call per key at a time, across processes."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from pigeon.idempotency import open_store
from pigeon.idempotency.base import ClaimState
from pigeon.idempotency.lease import Renewal
from pigeon.retry import RetryLater

if TYPE_CHECKING:
    from pigeon.core.processor import Delivery
    from pigeon.idempotency.base import IdempotencyStore
    from pigeon.middleware.base import CallNext, KeyFunc


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
