"""Two LetterThief instances against one PostgreSQL, on the three-node cluster.

Both collect from ``pigeon.dead-letters`` as competing consumers, each through
another node; no letter is stored twice (the same message failing twice is
one letter with two occurrences, whichever instance took each copy), and a
replay works from either instance.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from letterthief.service import LetterThief
from pigeon.settings import Settings
from tests.conftest import Broker, eventually, open_broker, unique_settings
from tests.letterthief.conftest import letters_when, lt_settings, postgres_database
from tests.rabbit import CLUSTER_NODES

pytestmark = pytest.mark.slow

LETTERS = 150


@pytest.fixture
def settings(prefix: str, rabbit_cluster: str) -> Settings:
    return unique_settings(prefix, url=rabbit_cluster)


@pytest.fixture
async def broker(prefix: str, rabbit_cluster: str) -> AsyncIterator[Broker]:
    async with open_broker(prefix, CLUSTER_NODES[0].url) as b:
        yield b


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A new PostgreSQL database of this test only, dropped after it."""
    async with postgres_database("lt_cluster") as url:
        yield url


def starting_at(first: int) -> str:
    """The cluster's URLs, starting with node ``first`` (so instances use other nodes)."""
    nodes = [*CLUSTER_NODES[first:], *CLUSTER_NODES[:first]]
    return ",".join(node.url for node in nodes)


async def fail(broker: Broker, settings: Settings, queue: str, message_ids: list[str]) -> None:
    """Dead-letter each message twice, as a listener of ``queue`` would after two failures."""
    channel = await broker.connection.channel()
    exchange = await channel.get_exchange(settings.dead_letter_exchange)
    for message_id in message_ids:
        for attempt in (1, 2):
            await exchange.publish(
                aio_pika.Message(
                    b'{"order_id": "o-1"}',
                    message_id=message_id,
                    type="order.placed",
                    app_id="orders",
                    content_type="application/json",
                    headers={
                        "x-pigeon-reason": "handler-error",
                        "x-pigeon-exception-type": "ValueError",
                        "x-pigeon-exception-message": f"no partner (try {attempt})",
                        "x-pigeon-queue": queue,
                        "x-pigeon-attempts": 3,
                    },
                ),
                routing_key=queue,
            )
    await channel.close()


async def original_queue(broker: Broker, settings: Settings) -> str:
    """The queue the letters failed in (a replay goes back to it); deleted after the test."""
    queue = f"{broker.prefix}-billing.charge"
    broker.queues.add(queue)
    broker.track(settings)
    broker.exchanges.add(settings.exchange)
    channel = await broker.connection.channel()
    await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
    await channel.close()
    return queue


async def start_two(
    settings: Settings, pg_url: str, first_nodes: tuple[int, int]
) -> list[LetterThief]:
    """Two collecting instances on one database, starting at the given nodes."""
    thieves = [
        LetterThief(
            lt_settings(pg_url, batch_wait=0.005),
            settings.model_copy(update={"url": starting_at(i), "url_shuffle": False}),
        )
        for i in first_nodes
    ]
    await thieves[0].open()  # migrations once, before both race for them
    await thieves[0].store.close()
    for thief in thieves:
        await thief.start()
    for thief in thieves:
        await asyncio.wait_for(thief.collector.ready.wait(), 30)
    return thieves


async def test_two_letterthiefs_on_one_postgresql_collect_once_and_replay_from_either(
    settings: Settings, broker: Broker, pg_url: str
) -> None:
    queue = await original_queue(broker, settings)
    thieves = await start_two(settings, pg_url, (0, 1))
    try:
        nodes = {thief.collector.connector.url for thief in thieves}
        assert len(nodes) == 2, "each instance collects through its own node"
        ids = [str(uuid.uuid4()) for _ in range(LETTERS)]
        await fail(broker, settings, queue, ids)
        letters = await letters_when(thieves[0].store, LETTERS, timeout=60, occurrences=2)
        assert {letter.message_id for letter in letters} == set(ids), "each message one letter"
        shares = [thief.metrics.collected.labels("dead-letter")._value.get() for thief in thieves]
        assert sum(shares) == 2 * LETTERS, "every copy collected exactly once"
        assert all(share > 0 for share in shares), f"both instances collected: {shares}"
        errors = [thief.metrics.store_errors._value.get() for thief in thieves]
        assert errors == [0, 0], "racing for the same new letter is not a store failure"
        for thief, letter in zip(thieves, letters[:2], strict=True):
            retried = await thief.replayer.retry(letter.id, "ops")
            assert retried.status == "retried"
            replayed = await broker.get(queue, timeout=15)
            assert replayed.message_id == letter.message_id
        other = await thieves[1].store.get(letters[0].id)
        assert other is not None
        assert other.status == "retried", "one store: the other instance sees the replay"
    finally:
        for thief in thieves:
            await thief.stop()


async def test_a_letterthief_whose_node_stops_collects_and_replays_through_another(
    settings: Settings, broker: Broker, pg_url: str
) -> None:
    queue = await original_queue(broker, settings)
    thieves = await start_two(settings, pg_url, (1, 2))
    lost = CLUSTER_NODES[1]
    try:
        assert thieves[0].collector.connector.url == lost.url
        await asyncio.to_thread(lost.stop)
        ids = [str(uuid.uuid4()) for _ in range(50)]
        await fail(broker, settings, queue, ids)
        letters = await letters_when(thieves[1].store, 50, timeout=60, occurrences=2)
        assert {letter.message_id for letter in letters} == set(ids)
        connector = thieves[0].collector.connector
        await eventually(
            lambda: connector.is_open and connector.url != lost.url, 30, "moved to another node"
        )
        retried = await thieves[0].replayer.retry(letters[0].id, "ops")
        assert retried.status == "retried"
        assert (await broker.get(queue, timeout=15)).message_id == letters[0].message_id
    finally:
        for thief in thieves:
            await thief.stop()
        await asyncio.to_thread(lost.start)
