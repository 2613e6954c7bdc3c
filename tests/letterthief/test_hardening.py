"""LetterThief under hostile letters, double clicks and stolen cookies (issue 13).

Each test reproduces one defect of the hardening review against the real
broker (and SQLite and PostgreSQL where storage matters).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from letterthief.service import LetterThief
from letterthief.web import create_app
from pigeon.settings import Settings
from tests.conftest import Broker
from tests.letterthief import hostile
from tests.letterthief.conftest import letters_when, lt_settings

ThiefFactory = Callable[..., Awaitable[LetterThief]]


@pytest.fixture
async def make_thief(
    settings: Settings, sqlite_url: str, broker: Broker
) -> AsyncIterator[ThiefFactory]:
    """Start a LetterThief (collector running) with settings overrides; stopped after."""
    started: list[LetterThief] = []
    broker.track(settings)

    async def make(database_url: str = sqlite_url, **overrides: Any) -> LetterThief:
        overrides.setdefault("replay_timeout", 3.0)
        thief = LetterThief(lt_settings(database_url, **overrides), settings)
        started.append(thief)
        await thief.start()
        await asyncio.wait_for(thief.collector.ready.wait(), 20)
        return thief

    try:
        yield make
    finally:
        for thief in started:
            await thief.stop()


def api(thief: LetterThief) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(thief)),
        base_url="http://letterthief.test",
        headers={"Authorization": "Bearer tok-123"},
    )


async def declare(broker: Broker, name: str) -> str:
    broker.queues.add(name)
    channel = await broker.connection.channel()
    await channel.declare_queue(name, durable=True)
    await channel.close()
    return name


async def dead_letter(settings: Settings, queue: str, message_id: str, **headers: Any) -> None:
    """A pigeon-shaped dead letter of ``queue``, published with pika."""
    await hostile.publish(
        settings.dead_letter_exchange,
        queue,
        headers={
            "x-pigeon-reason": "handler-error",
            "x-pigeon-exception-type": "ValueError",
            "x-pigeon-queue": queue,
            **headers,
        },
        message_id=message_id,
        type="order.placed",
    )


async def test_an_unencodable_letter_does_not_break_the_replays_after_it(
    make_thief: ThiefFactory, settings: Settings, broker: Broker
) -> None:
    """Defect 1: bytes, non-UTF-8 text and -1 in headers; then ordinary letters still replay."""
    thief = await make_thief()
    queue = await declare(broker, f"{broker.prefix}.charge")
    await dead_letter(
        settings,
        queue,
        "bad-bytes",
        **{"x-blob": b"\x01\x02", "x-latin": hostile.RawText(b"caf\xe9")},
    )
    await dead_letter(settings, queue, "bad-int", **{"x-small": -1})
    await dead_letter(settings, queue, "good-1")
    await dead_letter(settings, queue, "good-2")
    letters = {x.message_id: x.id for x in await letters_when(thief.store, 4)}
    async with api(thief) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        blob = await client.post(f"/api/dead-letters/{letters['bad-bytes']}/retry")
        assert blob.status_code == 200, blob.text
        small = await client.post(f"/api/dead-letters/{letters['bad-int']}/retry")
        # pigeon's encoder may or may not take -1; either way it is named, never a 503
        assert small.status_code in (200, 422), small.text
        if small.status_code == 422:
            assert "x-small" in small.json()["detail"]
        for name in ("good-1", "good-2"):
            good = await client.post(f"/api/dead-letters/{letters[name]}/retry")
            assert good.status_code == 200, good.text
            assert good.json()["status"] == "retried"
        assert loop.time() - started < 3.0
        expected = 3 + (small.status_code == 200)
        assert await broker.wait_count(queue, expected) == expected
        replayed = await broker.get(queue)
        assert replayed.message_id == "bad-bytes"
        assert replayed.headers is not None
        assert bytes(replayed.headers["x-blob"]) == b"\x01\x02"  # type: ignore[arg-type]
        for name in ("good-1", "good-2"):
            history = (await client.get(f"/api/dead-letters/{letters[name]}")).json()["history"]
            assert [h["result"] for h in history] == ["ok"]
    await asyncio.sleep(0.2)
    assert await broker.count(queue) == expected - 1  # each delivered once
