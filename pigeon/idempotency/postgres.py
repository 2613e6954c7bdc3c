"""An idempotency store in PostgreSQL, for listeners spread over several hosts.

Table ``pigeon_idempotency`` is created on first open. Expiry is computed
with the server's ``now()``, so the hosts' clocks never need to agree.

Claims and done marks are batched: those asked for during one turn of the
event loop go to PostgreSQL as one statement over arrays (``unnest``), one
round trip and one commit, and each caller gets its own answer after that
commit. While :data:`MAX_SENDING` statements are in flight, what is asked
meanwhile waits and goes with the next one (a group commit, as in the SQLite
store): under load one statement serves dozens of messages instead of many
small statements queueing for the pool and a commit each; alone, a call costs
one statement as before.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from pigeon.errors import ConfigurationError
from pigeon.idempotency.base import (
    OUTCOME_SUFFIX,
    Batches,
    Claim,
    ClaimState,
    IdempotencyStore,
    new_token,
)
from pigeon.settings import mask_url

MAX_SENDING = 2
"""Batch statements in flight at once per store; the next batch collects meanwhile."""

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
_CLAIM_MANY = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[]) AS i(key, token)
), claimed AS (
    INSERT INTO pigeon_idempotency AS t (key, state, token, expires_at)
    SELECT key, 'claimed', token, now() + make_interval(secs => $3) FROM input
    ON CONFLICT (key) DO UPDATE
    SET state = 'claimed', token = excluded.token, expires_at = excluded.expires_at
    WHERE t.expires_at <= now()
    RETURNING t.key
)
SELECT key, true AS won, NULL AS state, 0.0::float8 AS retry_after, NULL AS holder FROM claimed
UNION ALL
SELECT t.key, false, t.state, extract(epoch FROM t.expires_at - now())::float8, t.token
FROM pigeon_idempotency t JOIN input USING (key)
WHERE t.expires_at > now() AND t.key NOT IN (SELECT key FROM claimed)
"""
_DONE_MANY = """
INSERT INTO pigeon_idempotency (key, state, token, expires_at)
SELECT key, 'done', token, now() + make_interval(secs => $3)
FROM unnest($1::text[], $2::text[]) AS i(key, token)
ON CONFLICT (key) DO UPDATE
SET state = 'done', token = excluded.token, expires_at = excluded.expires_at
"""
_EXTEND = """
UPDATE pigeon_idempotency SET expires_at = now() + make_interval(secs => $3)
WHERE key = $1 AND token = $2 AND state = 'claimed' AND expires_at > now()
"""
_RELEASE = "DELETE FROM pigeon_idempotency WHERE key = $1 AND token = $2 AND state = 'claimed'"
_PURGE = "DELETE FROM pigeon_idempotency WHERE expires_at <= now()"
_RECORD = """
INSERT INTO pigeon_idempotency (key, state, token, expires_at)
VALUES ($1, 'outcome', $2, now() + make_interval(secs => $3))
ON CONFLICT (key) DO UPDATE
SET state = 'outcome', token = excluded.token, expires_at = excluded.expires_at
"""
_RECORDED = """
SELECT token FROM pigeon_idempotency WHERE key = $1 AND state = 'outcome' AND expires_at > now()
"""


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release ``RESET ALL``: no query here changes session state."""


_REFUSED = (asyncpg.InvalidCatalogNameError, asyncpg.InvalidAuthorizationSpecificationError)
"""A database that does not exist, a user refused (wrong password, no such role)."""


class PostgresStore(IdempotencyStore):
    """Keys in table ``pigeon_idempotency``, reached through an asyncpg pool.

    A batch of claims is one statement: ``INSERT ... ON CONFLICT DO UPDATE
    ... WHERE`` the row expired, ``RETURNING``; PostgreSQL's row lock makes
    exactly one of many concurrent claimers win. For the keys it loses, the
    same statement reads the holder's state and remaining lease. A row the
    statement cannot see yet (a concurrent claimer committed after it
    started) yields nothing, and that claim simply runs again. A key asked for
    twice in one batch is claimed once; the second caller finds it in progress.
    """

    def __init__(
        self, dsn: str, *, retention: float = 7 * 24 * 3600, max_connections: int = 10
    ) -> None:
        super().__init__(retention=retention)
        self.dsn = dsn
        self.max_connections = max_connections
        self._pool: asyncpg.Pool | None = None
        # one statement per kind and turn: claims of one lease (float), done marks (None)
        self._batches: Batches[tuple[str, str]] = Batches(self._send, max_sending=MAX_SENDING)

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=self.max_connections, reset=_keep_session
            )
        except _REFUSED as exc:  # no retry can cure these: a configuration error
            raise ConfigurationError(
                f"the PostgreSQL idempotency store at {mask_url(self.dsn)} refused: {exc}. "
                "Create the database or grant the user, or fix PIGEON_IDEMPOTENCY_URL."
            ) from None
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
        if self._pool is None:
            return
        await self._batches.drain()
        pool, self._pool = self._pool, None
        await pool.close()

    async def claim(self, key: str, lease: float) -> Claim:
        self._opened()
        token = new_token()
        row = None
        while row is None:  # None: a concurrent claimer's row is not visible yet; ask again
            row = await self._batches.add(float(lease), (key, token))
        won, state, retry_after, holder = row
        if won:
            return Claim(ClaimState.CLAIMED, token)
        if state == ClaimState.DONE.value:
            return Claim(ClaimState.DONE)
        return Claim(ClaimState.IN_PROGRESS, retry_after=max(retry_after, 0.0), holder=holder)

    async def extend(self, key: str, token: str, lease: float) -> bool:
        status = await self._opened().execute(_EXTEND, key, token, float(lease))
        return bool(status == "UPDATE 1")

    async def done(self, key: str, token: str) -> None:
        self._opened()
        await self._batches.add(None, (key, token))

    async def release(self, key: str, token: str) -> None:
        await self._opened().execute(_RELEASE, key, token)

    async def record_outcome(self, key: str, settled: int) -> None:
        await self._opened().execute(
            _RECORD, key + OUTCOME_SUFFIX, str(settled), float(self.retention)
        )

    async def recorded_outcome(self, key: str) -> int | None:
        token = await self._opened().fetchval(_RECORDED, key + OUTCOME_SUFFIX)
        return int(token) if token is not None else None

    async def purge(self) -> int:
        status = await self._opened().execute(_PURGE)
        return int(status.rpartition(" ")[2])

    def _opened(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("PostgresStore is not open: await store.open() first")
        return self._pool

    async def _send(self, lease: object, pairs: list[tuple[str, str]]) -> list[Any]:
        if isinstance(lease, float):
            return await self._claim_many(lease, pairs)
        return await self._done_many(pairs)

    async def _claim_many(self, lease: float, pairs: list[tuple[str, str]]) -> list[Any]:
        """One claim per distinct key; a repeated key in the batch loses to its first."""
        first: dict[str, str] = {}
        for key, token in pairs:
            first.setdefault(key, token)
        rows = await self._opened().fetch(_CLAIM_MANY, list(first), list(first.values()), lease)
        by_key = {row[0]: (row[1], row[2], row[3], row[4]) for row in rows}
        answers: list[Any] = []
        for key, token in pairs:
            row = by_key.get(key)
            if row is not None and row[0] and first[key] != token:
                row = (False, ClaimState.CLAIMED.value, lease, first[key])  # its first holds it
            answers.append(row)
        return answers

    async def _done_many(self, pairs: list[tuple[str, str]]) -> list[Any]:
        last = dict(pairs)  # a key once: PostgreSQL insists
        await self._opened().execute(_DONE_MANY, list(last), list(last.values()), self.retention)
        return [None] * len(pairs)
