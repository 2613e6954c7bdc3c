"""An idempotency store in Redis, for listeners spread over several hosts.

Redis expires the keys itself (``PX`` on every write), so nothing needs
purging and memory stays bounded by the keys live within ``retention``.
"""

from __future__ import annotations

from typing import NamedTuple

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from pigeon.idempotency.base import Claim, ClaimState, IdempotencyStore, new_token
from pigeon.settings import mask_url

KEY_PREFIX = "pigeon:idem:"

_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, 0} end
if redis.call('GET', KEYS[1]) == 'done' then return {2, 0} end
return {3, redis.call('PTTL', KEYS[1])}
"""
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


async def _close(client: aioredis.Redis) -> None:
    await client.aclose()
    await client.connection_pool.disconnect()


class _Connection(NamedTuple):
    client: aioredis.Redis
    claim: AsyncScript
    extend: AsyncScript
    release: AsyncScript


class RedisStore(IdempotencyStore):
    """Keys ``pigeon:idem:{key}`` holding a claim token or ``done``.

    At most ``max_connections`` commands are in flight; more wait for a
    connection (redis-py's blocking pool) instead of failing. A query string
    in ``url`` (``?max_connections=50``) overrides it.

    A claim is ``SET key token NX PX lease`` inside a Lua script that also
    reads the holder's state and remaining lease, so every claim is one atomic
    round trip. Done is ``SET key done PX retention``. Release and extend are
    compare-and-delete / compare-and-expire scripts, so only the token's holder
    can free or renew a claim.
    """

    def __init__(
        self, url: str, *, retention: float = 7 * 24 * 3600, max_connections: int = 10
    ) -> None:
        super().__init__(retention=retention)
        self.url = url
        self.max_connections = max_connections
        self._conn: _Connection | None = None

    async def open(self) -> None:
        if self._conn is not None:
            return
        client = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                self.url, max_connections=self.max_connections
            )
        )
        try:
            await client.ping()
        except (aioredis.ConnectionError, OSError) as exc:
            await _close(client)
            raise ConnectionError(
                f"cannot reach the Redis idempotency store at {mask_url(self.url)}: {exc}. "
                "Start Redis or fix PIGEON_IDEMPOTENCY_URL."
            ) from exc
        script = client.register_script
        self._conn = _Connection(client, script(_CLAIM), script(_EXTEND), script(_RELEASE))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn.client)

    async def claim(self, key: str, lease: float) -> Claim:
        token = new_token()
        state, pttl = await self._opened().claim(keys=[KEY_PREFIX + key], args=[token, _ms(lease)])
        if state == 1:
            return Claim(ClaimState.CLAIMED, token)
        if state == 2:
            return Claim(ClaimState.DONE)
        return Claim(ClaimState.IN_PROGRESS, retry_after=max(pttl, 0) / 1000)

    async def extend(self, key: str, token: str, lease: float) -> bool:
        conn = self._opened()
        return bool(await conn.extend(keys=[KEY_PREFIX + key], args=[token, _ms(lease)]) == 1)

    async def done(self, key: str, token: str) -> None:
        await self._opened().client.set(KEY_PREFIX + key, "done", px=_ms(self.retention))

    async def release(self, key: str, token: str) -> None:
        await self._opened().release(keys=[KEY_PREFIX + key], args=[token])

    async def purge(self) -> int:
        """Return 0: Redis deletes expired keys itself."""
        return 0

    def _opened(self) -> _Connection:
        if self._conn is None:
            raise RuntimeError("RedisStore is not open: await store.open() first")
        return self._conn
