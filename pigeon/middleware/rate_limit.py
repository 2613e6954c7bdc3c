"""``RateLimit``: at most ``n`` handler calls per window, in this process."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING

from pigeon.errors import ConfigurationError
from pigeon.retry import RetryLater

if TYPE_CHECKING:
    from pigeon.core.processor import Delivery
    from pigeon.middleware.base import CallNext, KeyFunc


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
