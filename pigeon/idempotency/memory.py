"""An in-process idempotency store, for tests and single-process listeners.

It forgets everything when the process exits and is not shared between
processes, so it only deduplicates redeliveries within one run.
"""

from __future__ import annotations

import time

from pigeon.idempotency.base import (
    OUTCOME_SUFFIX,
    Claim,
    ClaimState,
    IdempotencyStore,
    new_token,
)

_MIN_PURGE_AT = 1024


class MemoryStore(IdempotencyStore):
    """A dict of ``key -> (state, token, expires_at)`` on the monotonic clock.

    Each method runs without awaiting, so claims are atomic within the event
    loop. The dict is purged whenever it doubles in size, which keeps memory
    bounded by the keys live within ``retention`` without a background task.
    Not thread-safe: call it from the event loop.
    """

    def __init__(self, *, retention: float = 7 * 24 * 3600) -> None:
        super().__init__(retention=retention)
        self._rows: dict[str, tuple[ClaimState, str, float]] = {}
        self._purge_at = _MIN_PURGE_AT

    async def open(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to release; the rows stay until the store is garbage collected."""

    async def claim(self, key: str, lease: float) -> Claim:
        now = time.monotonic()
        row = self._rows.get(key)
        if row is not None and row[2] > now:
            if row[0] is ClaimState.DONE:
                return Claim(ClaimState.DONE)
            return Claim(ClaimState.IN_PROGRESS, retry_after=row[2] - now, holder=row[1])
        token = new_token()
        self._rows[key] = (ClaimState.CLAIMED, token, now + lease)
        if len(self._rows) >= self._purge_at:
            self._purge(now)
            self._purge_at = max(_MIN_PURGE_AT, 2 * len(self._rows))
        return Claim(ClaimState.CLAIMED, token)

    async def extend(self, key: str, token: str, lease: float) -> bool:
        now = time.monotonic()
        row = self._rows.get(key)
        if row is None or row[0] is not ClaimState.CLAIMED or row[1] != token or row[2] <= now:
            return False
        self._rows[key] = (ClaimState.CLAIMED, token, now + lease)
        return True

    async def done(self, key: str, token: str) -> None:
        self._rows[key] = (ClaimState.DONE, token, time.monotonic() + self.retention)

    async def release(self, key: str, token: str) -> None:
        row = self._rows.get(key)
        if row is not None and row[0] is ClaimState.CLAIMED and row[1] == token:
            del self._rows[key]

    async def record_outcome(self, key: str, settled: int) -> None:
        now = time.monotonic()
        self._rows[key + OUTCOME_SUFFIX] = (ClaimState.DONE, str(settled), now + self.retention)

    async def recorded_outcome(self, key: str) -> int | None:
        row = self._rows.get(key + OUTCOME_SUFFIX)
        return int(row[1]) if row is not None and row[2] > time.monotonic() else None

    async def purge(self) -> int:
        return self._purge(time.monotonic())

    def _purge(self, now: float) -> int:
        expired = [key for key, row in self._rows.items() if row[2] <= now]
        for key in expired:
            del self._rows[key]
        return len(expired)
