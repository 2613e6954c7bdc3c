"""An idempotency store in PostgreSQL, for listeners spread over several hosts.

Table ``pigeon_idempotency`` is created on first open. Expiry is computed
with the server's ``now()``, so the hosts' clocks never need to agree.
"""

from __future__ import annotations

import asyncpg

from pigeon.idempotency.base import Claim, ClaimState, IdempotencyStore, new_token
from pigeon.settings import mask_url

_SCHEMA = """
SELECT pg_advisory_xact_lock(hashtext('pigeon_idempotency'));
CREATE TABLE IF NOT EXISTS pigeon_idempotency (
    key text PRIMARY KEY,
    state text NOT NULL,
    token text,
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS pigeon_idempotency_expires_at ON pigeon_idempotency (expires_at);
"""
_CLAIM = """
WITH claimed AS (
    INSERT INTO pigeon_idempotency AS t (key, state, token, expires_at)
    VALUES ($1, 'claimed', $2, now() + make_interval(secs => $3))
    ON CONFLICT (key) DO UPDATE
    SET state = 'claimed', token = excluded.token, expires_at = excluded.expires_at
    WHERE t.expires_at <= now()
    RETURNING 1
)
SELECT true AS won, NULL AS state, 0.0::float8 AS retry_after FROM claimed
UNION ALL
SELECT false, state, extract(epoch FROM expires_at - now())::float8 FROM pigeon_idempotency
WHERE key = $1 AND expires_at > now() AND NOT EXISTS (SELECT FROM claimed)
"""
_DONE = """
INSERT INTO pigeon_idempotency (key, state, token, expires_at)
VALUES ($1, 'done', $2, now() + make_interval(secs => $3))
ON CONFLICT (key) DO UPDATE
SET state = 'done', token = excluded.token, expires_at = excluded.expires_at
"""
_EXTEND = """
UPDATE pigeon_idempotency SET expires_at = now() + make_interval(secs => $3)
WHERE key = $1 AND token = $2 AND state = 'claimed' AND expires_at > now()
"""
_RELEASE = "DELETE FROM pigeon_idempotency WHERE key = $1 AND token = $2 AND state = 'claimed'"
_PURGE = "DELETE FROM pigeon_idempotency WHERE expires_at <= now()"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release ``RESET ALL``: no query here changes session state."""


class PostgresStore(IdempotencyStore):
    """Keys in table ``pigeon_idempotency``, reached through an asyncpg pool.

    A claim is one statement: ``INSERT ... ON CONFLICT DO UPDATE ... WHERE``
    the row expired, ``RETURNING``; PostgreSQL's row lock makes exactly one
    of many concurrent claimers win. When it loses, the same statement reads
    the holder's state and remaining lease. A row the statement cannot see
    yet (a concurrent claimer committed after it started) yields nothing, and
    the claim simply runs again.
    """

    def __init__(
        self, dsn: str, *, retention: float = 7 * 24 * 3600, max_connections: int = 10
    ) -> None:
        super().__init__(retention=retention)
        self.dsn = dsn
        self.max_connections = max_connections
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=self.max_connections, reset=_keep_session
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise ConnectionError(
                f"cannot open the PostgreSQL idempotency store at {mask_url(self.dsn)}: {exc}. "
                "Start PostgreSQL or fix PIGEON_IDEMPOTENCY_URL."
            ) from exc
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(_SCHEMA)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def claim(self, key: str, lease: float) -> Claim:
        pool = self._opened()
        token = new_token()
        row = None
        while row is None:
            row = await pool.fetchrow(_CLAIM, key, token, float(lease))
        won, state, retry_after = row
        if won:
            return Claim(ClaimState.CLAIMED, token)
        if state == ClaimState.DONE.value:
            return Claim(ClaimState.DONE)
        return Claim(ClaimState.IN_PROGRESS, retry_after=max(retry_after, 0.0))

    async def extend(self, key: str, token: str, lease: float) -> bool:
        status = await self._opened().execute(_EXTEND, key, token, float(lease))
        return bool(status == "UPDATE 1")

    async def done(self, key: str, token: str) -> None:
        await self._opened().execute(_DONE, key, token, self.retention)

    async def release(self, key: str, token: str) -> None:
        await self._opened().execute(_RELEASE, key, token)

    async def purge(self) -> int:
        status = await self._opened().execute(_PURGE)
        return int(status.rpartition(" ")[2])

    def _opened(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("PostgresStore is not open: await store.open() first")
        return self._pool
