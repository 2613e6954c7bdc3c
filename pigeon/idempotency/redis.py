"""An idempotency store in Redis, for listeners spread over several hosts.

Redis expires the keys itself (``PX`` on every write), so nothing needs
purging and memory stays bounded by the keys live within ``retention``.

Commands are pipelined: whatever the listener's tasks ask for during one turn
of the event loop goes to Redis as one pipeline (not a transaction: each
command stays atomic on its own), and each caller gets its own reply. Under
load one round trip serves dozens of messages; alone, a call costs one round
trip as before.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from pigeon.idempotency.base import (
    OUTCOME_SUFFIX,
    Batches,
    Claim,
    ClaimState,
    IdempotencyStore,
    new_token,
)
from pigeon.settings import mask_url

KEY_PREFIX = "pigeon:idem:"

_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, 0} end
if redis.call('GET', KEYS[1]) == 'done' then return {2, 0} end
return {3, redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[1])}
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


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


_SCRIPTS = {_sha(script): script for script in (_CLAIM, _EXTEND, _RELEASE)}
_CLAIM_SHA, _EXTEND_SHA, _RELEASE_SHA = _SCRIPTS

_Command = tuple[str | int, ...]


async def _close(client: aioredis.Redis) -> None:
    await client.aclose()
    await client.connection_pool.disconnect()


class RedisStore(IdempotencyStore):
    """Keys ``pigeon:idem:{key}`` holding a claim token or ``done``.

    At most ``max_connections`` pipelines are in flight; more wait for a
    connection (redis-py's blocking pool) instead of failing. A query string
    in ``url`` (``?max_connections=50``) overrides it.

    A claim is ``SET key token NX PX lease`` inside a Lua script that also
    reads the holder's state and remaining lease, so every claim is atomic.
    Done is ``SET key done PX retention``. Release and extend are
    compare-and-delete / compare-and-expire scripts, so only the token's holder
    can free or renew a claim. The scripts are loaded when the store opens,
    and again if Redis lost them (a restart, ``SCRIPT FLUSH``).
    """

    def __init__(
        self, url: str, *, retention: float = 7 * 24 * 3600, max_connections: int = 10
    ) -> None:
        super().__init__(retention=retention)
        self.url = url
        self.max_connections = max_connections
        self._client: aioredis.Redis | None = None
        self._batches: Batches[_Command] = Batches(self._replies)

    async def open(self) -> None:
        if self._client is not None:
            return
        client = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                self.url, max_connections=self.max_connections
            )
        )
        try:
            await client.ping()
            await _load_scripts(client)
        except (aioredis.ConnectionError, OSError) as exc:
            await _close(client)
            raise ConnectionError(
                f"cannot reach the Redis idempotency store at {mask_url(self.url)}: {exc}. "
                "Start Redis or fix PIGEON_IDEMPOTENCY_URL."
            ) from exc
        self._client = client

    async def close(self) -> None:
        client = self._client
        if client is None:
            return
        await self._batches.drain()
        self._client = None
        await _close(client)

    async def claim(self, key: str, lease: float) -> Claim:
        token = new_token()
        state, pttl, *held = await self._call(
            "EVALSHA", _CLAIM_SHA, 1, KEY_PREFIX + key, token, _ms(lease)
        )
        if state == 1:
            return Claim(ClaimState.CLAIMED, token)
        if state == 2:
            return Claim(ClaimState.DONE)
        holder = held[0].decode() if held and isinstance(held[0], bytes) else None
        return Claim(ClaimState.IN_PROGRESS, retry_after=max(pttl, 0) / 1000, holder=holder)

    async def extend(self, key: str, token: str, lease: float) -> bool:
        result = await self._call("EVALSHA", _EXTEND_SHA, 1, KEY_PREFIX + key, token, _ms(lease))
        return bool(result == 1)

    async def done(self, key: str, token: str) -> None:
        await self._call("SET", KEY_PREFIX + key, "done", "PX", _ms(self.retention))

    async def release(self, key: str, token: str) -> None:
        await self._call("EVALSHA", _RELEASE_SHA, 1, KEY_PREFIX + key, token)

    async def record_outcome(self, key: str, settled: int) -> None:
        await self._call(
            "SET", KEY_PREFIX + key + OUTCOME_SUFFIX, str(settled), "PX", _ms(self.retention)
        )

    async def recorded_outcome(self, key: str) -> int | None:
        value = await self._call("GET", KEY_PREFIX + key + OUTCOME_SUFFIX)
        return int(value) if value is not None else None

    async def purge(self) -> int:
        """Return 0: Redis deletes expired keys itself."""
        return 0

    def _call(self, *command: str | int) -> asyncio.Future[Any]:
        """Queue ``command`` for this loop turn's pipeline; the future is its reply."""
        if self._client is None:
            raise RuntimeError("RedisStore is not open: await store.open() first")
        return self._batches.add(None, command)

    async def _replies(self, _: object, commands: list[_Command]) -> list[Any]:
        """One pipeline for this turn's ``commands``; their replies in order."""
        assert self._client is not None
        client = self._client
        replies = await _pipeline(client, commands)
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if lost:  # Redis restarted or flushed its scripts since we loaded them
            await _load_scripts(client)
            again = await _pipeline(client, [commands[i] for i in lost])
            for i, reply in zip(lost, again, strict=True):
                replies[i] = reply
        return replies


async def _pipeline(client: aioredis.Redis, commands: list[_Command]) -> list[Any]:
    """Run ``commands`` in one round trip; a command's error is its reply, not raised."""
    async with client.pipeline(transaction=False) as pipe:
        for command in commands:
            pipe.execute_command(*command)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies


async def _load_scripts(client: aioredis.Redis) -> None:
    for script in _SCRIPTS.values():
        await client.script_load(script)
