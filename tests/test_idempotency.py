"""Idempotency stores: one set of test bodies, run against every store.

Redis and PostgreSQL are the real servers on this machine; when one is down
these tests fail rather than skip. Each test uses keys under a unique prefix
and deletes them afterwards.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Protocol

import asyncpg
import pytest
import redis.asyncio as aioredis

from pigeon.idempotency import ClaimState, IdempotencyStore, open_store
from pigeon.idempotency.base import answer_each, new_token
from pigeon.idempotency.memory import MemoryStore
from pigeon.idempotency.owner import holder_is_dead, owner
from pigeon.idempotency.postgres import PostgresStore
from pigeon.idempotency.redis import KEY_PREFIX, RedisStore
from pigeon.idempotency.sqlite import SQLiteStore
from tests.tcpproxy import TcpProxy

REDIS_URL = "redis://127.0.0.1:6379/15"
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
STORE_KINDS = ["memory", "sqlite", "redis", "postgres"]


class StoreFactory(Protocol):
    def __call__(self, *, retention: float = ...) -> Awaitable[IdempotencyStore]: ...


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex}:"


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def make_store(store_kind: str, prefix: str, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Open stores of ``store_kind``; close them and delete this test's keys afterwards."""
    urls = {
        "memory": "memory://",
        "sqlite": f"sqlite:///{tmp_path}/idempotency.db",
        "redis": REDIS_URL,
        "postgres": POSTGRES_URL,
    }
    opened: list[IdempotencyStore] = []

    async def factory(*, retention: float = 7 * 24 * 3600) -> IdempotencyStore:
        store = open_store(urls[store_kind], retention=retention)
        await store.open()
        opened.append(store)
        return store

    try:
        yield factory
    finally:
        for store in opened:
            await store.close()
        if store_kind == "redis":
            await _delete_redis_keys(prefix)
        elif store_kind == "postgres":
            await _delete_postgres_keys(prefix)


async def _delete_redis_keys(prefix: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{KEY_PREFIX}{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def _postgres_keys(prefix: str) -> set[str]:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        rows = await conn.fetch(
            "SELECT key FROM pigeon_idempotency WHERE key LIKE $1", prefix + "%"
        )
    finally:
        await conn.close()
    return {row["key"] for row in rows}


async def _delete_postgres_keys(prefix: str) -> None:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute("DELETE FROM pigeon_idempotency WHERE key LIKE $1", prefix + "%")
    finally:
        await conn.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> IdempotencyStore:
    return await make_store()


@pytest.fixture
def key(prefix: str) -> str:
    return f"{prefix}notification.send-confirmation:{uuid.uuid4()}"


async def test_first_claim_of_a_key_is_claimed_with_a_token(
    store: IdempotencyStore, key: str
) -> None:
    claim = await store.claim(key, lease=30)

    assert claim.state is ClaimState.CLAIMED
    assert claim.token
    assert claim.retry_after == 0.0


async def test_second_claim_while_held_is_in_progress_with_the_lease_left(
    store: IdempotencyStore, key: str
) -> None:
    await store.claim(key, lease=30)

    second = await store.claim(key, lease=30)

    assert second.state is ClaimState.IN_PROGRESS
    assert second.token is None
    assert 0 < second.retry_after <= 30


async def test_claim_after_done_is_done(store: IdempotencyStore, key: str) -> None:
    await store.done(key, await _claimed(store, key))

    assert (await store.claim(key, lease=30)).state is ClaimState.DONE


async def test_claim_after_release_is_claimed_again_with_a_new_token(
    store: IdempotencyStore, key: str
) -> None:
    first = await _claimed(store, key)
    await store.release(key, first)

    second = await store.claim(key, lease=30)

    assert second.state is ClaimState.CLAIMED
    assert second.token != first


async def test_release_after_done_keeps_the_key_done(store: IdempotencyStore, key: str) -> None:
    token = await _claimed(store, key)
    await store.done(key, token)

    await store.release(key, token)

    assert (await store.claim(key, lease=30)).state is ClaimState.DONE


async def test_expired_lease_is_claimed_by_another_and_the_stale_release_keeps_the_new_claim(
    store: IdempotencyStore, key: str
) -> None:
    stale = await _claimed(store, key, lease=0.2)
    await asyncio.sleep(0.3)

    fresh = await _claimed(store, key)
    await store.release(key, stale)

    assert fresh != stale
    assert (await store.claim(key, lease=30)).state is ClaimState.IN_PROGRESS
    await store.done(key, fresh)
    assert (await store.claim(key, lease=30)).state is ClaimState.DONE


async def test_done_after_the_lease_expired_still_marks_the_key_done(
    store: IdempotencyStore, key: str
) -> None:
    token = await _claimed(store, key, lease=0.1)
    await asyncio.sleep(0.2)

    await store.done(key, token)

    assert (await store.claim(key, lease=30)).state is ClaimState.DONE


async def test_done_after_the_expired_claim_was_purged_still_marks_the_key_done(
    store: IdempotencyStore, key: str
) -> None:
    """A handler slower than its lease and a purge in between: the row is gone."""
    token = await _claimed(store, key, lease=0.1)
    await asyncio.sleep(0.2)
    await store.purge()

    await store.done(key, token)

    assert (await store.claim(key, lease=30)).state is ClaimState.DONE


async def test_extend_keeps_a_claim_past_its_first_lease(store: IdempotencyStore, key: str) -> None:
    token = await _claimed(store, key, lease=0.3)

    assert await store.extend(key, token, lease=30)
    await asyncio.sleep(0.4)

    assert (await store.claim(key, lease=30)).state is ClaimState.IN_PROGRESS


async def test_extend_of_a_lost_claim_is_false_and_leaves_the_new_holder_alone(
    store: IdempotencyStore, key: str
) -> None:
    stale = await _claimed(store, key, lease=0.2)
    await asyncio.sleep(0.3)
    assert not await store.extend(key, stale, lease=30)

    await _claimed(store, key, lease=0.3)
    assert not await store.extend(key, stale, lease=30)
    await asyncio.sleep(0.4)

    assert (await store.claim(key, lease=30)).state is ClaimState.CLAIMED


async def test_extend_after_done_or_release_is_false(store: IdempotencyStore, prefix: str) -> None:
    done_key, released_key = f"{prefix}done", f"{prefix}released"
    done_token = await _claimed(store, done_key)
    await store.done(done_key, done_token)
    released_token = await _claimed(store, released_key)
    await store.release(released_key, released_token)

    assert not await store.extend(done_key, done_token, lease=30)
    assert not await store.extend(released_key, released_token, lease=30)
    assert (await store.claim(done_key, lease=30)).state is ClaimState.DONE


async def test_done_key_past_retention_can_be_claimed_again_before_any_purge(
    make_store: StoreFactory, key: str
) -> None:
    store = await make_store(retention=0.3)
    await store.done(key, await _claimed(store, key))
    await asyncio.sleep(0.4)

    assert (await store.claim(key, lease=30)).state is ClaimState.CLAIMED


async def test_purge_deletes_done_keys_past_retention_and_expired_claims(
    make_store: StoreFactory, prefix: str, store_kind: str
) -> None:
    store = await make_store(retention=0.3)
    done_key, abandoned_key, live_key = (f"{prefix}{name}" for name in ("done", "gone", "live"))
    await store.done(done_key, await _claimed(store, done_key))
    await _claimed(store, abandoned_key, lease=0.1)
    await asyncio.sleep(0.4)
    await _claimed(store, live_key, lease=30)

    purged = await store.purge()

    if store_kind == "redis":
        assert purged == 0, "Redis expires keys itself; purge has nothing to delete"
    elif store_kind == "postgres":
        assert await _postgres_keys(prefix) == {live_key}, (
            "expired rows gone; the table is shared, so the count is not ours alone"
        )
    else:
        assert purged == 2
    assert (await store.claim(done_key, lease=30)).state is ClaimState.CLAIMED
    assert (await store.claim(abandoned_key, lease=30)).state is ClaimState.CLAIMED
    assert (await store.claim(live_key, lease=30)).state is ClaimState.IN_PROGRESS


async def test_twenty_concurrent_claims_of_a_key_yield_exactly_one_claimed(
    store: IdempotencyStore, prefix: str
) -> None:
    keys = [f"{prefix}concurrent:{n}" for n in range(25)]

    claims = await asyncio.gather(*(store.claim(k, lease=30) for _ in range(20) for k in keys))

    for n, k in enumerate(keys):
        states = [claim.state for claim in claims[n :: len(keys)]]
        assert states.count(ClaimState.CLAIMED) == 1, k
        assert states.count(ClaimState.IN_PROGRESS) == 19, k


async def test_callers_of_one_loop_turn_each_get_their_own_answer(
    store: IdempotencyStore, prefix: str
) -> None:
    """The shared stores batch what one loop turn asks for; the answers must not mix."""
    keys = [f"{prefix}batch:{n}" for n in range(200)]
    first = await asyncio.gather(*(store.claim(k, lease=30) for k in keys))
    assert [c.state for c in first] == [ClaimState.CLAIMED] * 200
    assert len({c.token for c in first}) == 200
    done = [store.done(k, c.token or "") for k, c in zip(keys[:100], first[:100], strict=True)]
    twice = [store.done(keys[0], first[0].token or "")]  # the same key twice in one batch
    await asyncio.gather(*done, *twice)
    second = await asyncio.gather(*(store.claim(k, lease=30) for k in keys))
    assert [c.state for c in second] == [ClaimState.DONE] * 100 + [ClaimState.IN_PROGRESS] * 100


async def test_open_and_close_can_be_called_twice(store: IdempotencyStore, key: str) -> None:
    await store.open()
    assert (await store.claim(key, lease=30)).state is ClaimState.CLAIMED
    await store.close()
    await store.close()


_start_together: Barrier | None = None


def _share_the_start_barrier(barrier: Barrier) -> None:
    global _start_together
    _start_together = barrier


def _claim_all_in_a_process(path: str, keys: list[str]) -> list[str]:
    """Open the shared file and claim every key, both steps in step with the other process."""
    start = _start_together
    assert start is not None

    async def claim_all() -> list[str]:
        won = []
        start.wait(timeout=60)
        async with SQLiteStore(path) as store:
            start.wait(timeout=60)
            for key in keys:
                claim = await store.claim(key, lease=60)
                if claim.token is not None:
                    won.append(key)
                    await store.done(key, claim.token)
        return won

    return asyncio.run(claim_all())


async def test_two_processes_sharing_a_sqlite_file_claim_each_key_exactly_once(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "shared" / "idempotency.db")
    keys = [f"orders.audit:{n}" for n in range(200)]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        2, mp_context=spawn, initializer=_share_the_start_barrier, initargs=(spawn.Barrier(2),)
    ) as processes:
        runs = [processes.submit(_claim_all_in_a_process, path, keys) for _ in range(2)]
        won = await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, runs)), 120)

    assert sorted(won[0] + won[1]) == sorted(keys)
    async with SQLiteStore(path) as store:
        states = {(await store.claim(k, lease=30)).state for k in keys}
    assert states == {ClaimState.DONE}


@pytest.mark.parametrize(
    ("url", "store_type"),
    [
        ("memory://", MemoryStore),
        ("sqlite:///relative/idempotency.db", SQLiteStore),
        ("redis://127.0.0.1:6379/0", RedisStore),
        ("rediss://:secret@redis.example:6380/1", RedisStore),
        ("postgresql://postgres@127.0.0.1/test", PostgresStore),
        ("postgres://postgres@127.0.0.1/test", PostgresStore),
        ("postgresql+asyncpg://postgres@127.0.0.1/test", PostgresStore),
    ],
)
def test_open_store_picks_the_store_from_the_url_scheme(
    url: str, store_type: type[IdempotencyStore]
) -> None:
    store = open_store(url, retention=60)

    assert type(store) is store_type
    assert store.retention == 60


def test_sqlite_url_takes_a_relative_path_after_three_slashes_and_absolute_after_four() -> None:
    relative = open_store("sqlite:///.pigeon/idempotency.db")
    absolute = open_store("sqlite:////var/lib/pigeon/idempotency.db")

    assert isinstance(relative, SQLiteStore)
    assert isinstance(absolute, SQLiteStore)
    assert relative.path == Path(".pigeon/idempotency.db")
    assert absolute.path == Path("/var/lib/pigeon/idempotency.db")


async def test_sqlite_store_creates_the_directory_of_its_file(tmp_path: Path, key: str) -> None:
    path = tmp_path / "not" / "yet" / "there.db"

    async with open_store(f"sqlite:///{path}") as store:
        assert (await store.claim(key, lease=30)).state is ClaimState.CLAIMED
    assert path.exists()


def test_postgres_url_variants_become_one_asyncpg_dsn() -> None:
    store = open_store("postgresql+asyncpg://app:secret@db.example:5432/orders")

    assert isinstance(store, PostgresStore)
    assert store.dsn == "postgresql://app:secret@db.example:5432/orders"


@pytest.mark.parametrize(
    "url", ["mysql://app:secret@db.example/orders", "app:secret@db.example", "sqlite://host/x.db"]
)
def test_bad_url_is_a_value_error_with_the_fix_and_no_password(url: str) -> None:
    with pytest.raises(ValueError, match=r"memory://|sqlite:///relative") as info:
        open_store(url)

    assert "secret" not in str(info.value)


def test_unknown_scheme_error_names_every_supported_scheme() -> None:
    with pytest.raises(ValueError, match="unsupported") as info:
        open_store("mysql://app:secret@db.example/orders")

    message = str(info.value)
    assert "mysql://app:***@db.example/orders" in message
    for scheme in ("memory://", "sqlite://", "redis://", "rediss://", "postgresql://"):
        assert scheme in message


@pytest.mark.parametrize(
    ("url", "package", "extra"),
    [
        ("redis://:secret@127.0.0.1:6379/0", "redis", "pigeon-bus[redis]"),
        ("postgresql://app:secret@127.0.0.1/test", "asyncpg", "pigeon-bus[postgres]"),
    ],
)
def test_missing_driver_is_an_import_error_naming_the_extra_and_no_password(
    monkeypatch: pytest.MonkeyPatch, url: str, package: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)
    for module in ("pigeon.idempotency.redis", "pigeon.idempotency.postgres"):
        monkeypatch.delitem(sys.modules, module, raising=False)

    with pytest.raises(ImportError, match=re.escape(f"pip install '{extra}'")) as info:
        open_store(url)

    assert "secret" not in str(info.value)
    assert "***" in str(info.value)


@pytest.mark.parametrize("retention", [0, -1.0])
def test_retention_must_be_positive(retention: float) -> None:
    with pytest.raises(ValueError, match="retention"):
        open_store("memory://", retention=retention)


@pytest.mark.parametrize(
    "url", ["redis://:secret@127.0.0.1:1/0", "postgresql://app:secret@127.0.0.1:1/test"]
)
async def test_unreachable_server_is_a_connection_error_without_the_password(url: str) -> None:
    store = open_store(url)

    with pytest.raises(ConnectionError, match="cannot") as info:
        await store.open()

    assert "secret" not in str(info.value)
    assert "127.0.0.1:1" in str(info.value)


@pytest.mark.parametrize("url", ["sqlite:///never-opened.db", REDIS_URL, POSTGRES_URL])
async def test_using_a_store_before_open_says_to_open_it(url: str) -> None:
    with pytest.raises(RuntimeError, match=r"await store\.open\(\)"):
        await open_store(url).claim("orders.audit:1", lease=30)


async def _claimed(store: IdempotencyStore, key: str, lease: float = 30) -> str:
    """Claim ``key``, insist it was free, and return the token."""
    claim = await store.claim(key, lease)
    assert claim.state is ClaimState.CLAIMED
    assert claim.token is not None
    return claim.token


async def test_redis_claims_work_after_redis_lost_its_scripts(prefix: str) -> None:
    store = RedisStore(REDIS_URL)
    await store.open()
    admin = aioredis.Redis.from_url(REDIS_URL)
    try:
        await admin.script_flush()  # what a Redis restart does to loaded scripts
        keys = [f"{prefix}k{i}" for i in range(3)]
        claims = await asyncio.gather(*(store.claim(k, 30) for k in keys))
        assert [c.state for c in claims] == [ClaimState.CLAIMED] * 3
        await admin.script_flush()
        await store.release(keys[0], claims[0].token or "")
        assert (await store.claim(keys[0], 30)).state is ClaimState.CLAIMED
    finally:
        await admin.aclose()
        await store.close()
        await _delete_redis_keys(prefix)


THROUGH_PROXY: dict[str, tuple[int, Callable[[int], IdempotencyStore]]] = {
    "redis": (6379, lambda port: RedisStore(f"redis://127.0.0.1:{port}/15")),
    "postgres": (5432, lambda port: PostgresStore(POSTGRES_URL.replace(":5432/", f":{port}/"))),
}


@pytest.mark.parametrize("kind", list(THROUGH_PROXY))
async def test_the_server_going_away_fails_each_waiting_call_and_the_store_recovers(
    kind: str, prefix: str
) -> None:
    target, make = THROUGH_PROXY[kind]
    proxy = TcpProxy(target_port=target)
    await proxy.start()
    store = make(proxy.port)
    await store.open()
    try:
        await proxy.stop()
        keys = [f"{prefix}k{i}" for i in range(5)]
        failed = await asyncio.gather(*(store.claim(k, 30) for k in keys), return_exceptions=True)
        assert all(isinstance(r, Exception) for r in failed), failed
        proxy = TcpProxy(target_port=target, port=proxy.port)
        await proxy.start()
        claims = await asyncio.gather(*(store.claim(k, 30) for k in keys))
        assert [c.state for c in claims] == [ClaimState.CLAIMED] * 5
    finally:
        await store.close()
        await proxy.stop()
        await (_delete_redis_keys if kind == "redis" else _delete_postgres_keys)(prefix)


async def test_a_batch_hands_each_caller_its_answer_its_error_or_the_batch_failure() -> None:
    loop = asyncio.get_running_loop()

    async def replies() -> list[object]:
        return ["a", ValueError("this one only"), "c"]

    futures = [loop.create_future() for _ in range(3)]
    futures[2].cancel()  # its caller gave up
    await answer_each(futures, replies())
    assert futures[0].result() == "a"
    with pytest.raises(ValueError, match="this one only"):
        futures[1].result()
    assert futures[2].cancelled()

    async def unreachable() -> list[object]:
        raise ConnectionError("store down")

    futures = [loop.create_future() for _ in range(2)]
    await answer_each(futures, unreachable())
    for future in futures:
        with pytest.raises(ConnectionError, match="store down"):
            future.result()


async def test_a_recorded_outcome_is_read_back_and_leaves_the_claim_alone(
    store: IdempotencyStore, key: str, prefix: str
) -> None:
    first = await store.claim(key, lease=30)
    assert await store.recorded_outcome(key) is None
    await store.record_outcome(key, 2)
    assert await store.recorded_outcome(key) == 2
    assert (await store.claim(key, lease=30)).state is ClaimState.IN_PROGRESS
    assert first.token is not None
    await store.release(key, first.token)
    assert (await store.claim(key, lease=30)).state is ClaimState.CLAIMED
    await store.record_outcome(key, 3)
    assert await store.recorded_outcome(key) == 3, "a later outcome replaces the earlier"
    assert await store.recorded_outcome(f"{prefix}other") is None


async def test_an_in_progress_claim_names_its_holder_who_is_alive(
    store: IdempotencyStore, key: str
) -> None:
    first = await store.claim(key, lease=30)
    second = await store.claim(key, lease=30)
    assert second.state is ClaimState.IN_PROGRESS
    assert second.holder == first.token
    assert second.holder is not None
    assert f":{os.getpid()}:" in second.holder
    assert not holder_is_dead(second.holder), "this very process holds it"
    await store.release(key, second.holder)
    assert (await store.claim(key, lease=30)).state is ClaimState.CLAIMED, "released by holder"


def test_a_holder_is_dead_only_when_provably_gone_from_this_host() -> None:
    here = owner().rsplit(":", 2)[0]
    gone = subprocess.Popen(["true"])
    gone.wait()
    mine = new_token()
    assert not holder_is_dead(mine)
    assert holder_is_dead(f"abc@{here}:{gone.pid}:1")
    assert holder_is_dead(f"abc@{here}:{os.getpid()}:1"), "this pid, another start: reused"
    assert not holder_is_dead(f"abc@elsewhere/b/1:{gone.pid}:1"), "another host: unknown"
    assert not holder_is_dead("0123abcd"), "a token of an older Pigeon names no owner"
