"""The collector against the real broker: what it understands and what it never loses."""

from __future__ import annotations

import asyncio
import json
import sys

import aio_pika
import pytest

from letterthief.queries import Filters
from letterthief.service import LetterThief
from letterthief.store import Store
from pigeon import Context, Retry
from pigeon.settings import Settings
from tests.conftest import AppFactory, Broker, RunWorker, eventually, settings_env
from tests.letterthief.conftest import letters_when, lt_settings


async def test_a_failing_pigeon_listener_becomes_a_letter_with_its_exception(
    thief: LetterThief, make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("billing")

    @app.listener("thing.happened", retry=Retry(attempts=1))
    async def charge(payload: dict[str, object], ctx: Context) -> None:
        raise ValueError("no partner for region")

    await run_worker(app)
    message_id = await app.dispatch_async("thing.happened", {"x": 1}, correlation_id="c-9")
    (item,) = await letters_when(thief.store, 1)
    letter = await thief.store.get(item.id)
    assert letter is not None
    assert letter.message_id == message_id
    assert letter.queue == f"{app.service}.charge"
    assert letter.event == "thing.happened"
    assert letter.service == app.service
    assert letter.reason == "handler-error"
    assert letter.exception_type == "ValueError"
    assert letter.exception_message == "no partner for region"
    assert "raise ValueError" in letter.traceback
    assert letter.attempts == 1
    assert letter.correlation_id == "c-9"
    assert letter.exchange == app.settings.exchange
    assert letter.routing_key == "thing.happened"
    assert json.loads(letter.body) == {"x": 1}
    assert letter.properties["app_id"] == app.service
    assert letter.failed_at is not None


async def test_a_plain_consumer_rejecting_a_message_is_read_from_x_death(
    thief: LetterThief, broker: Broker, settings: Settings
) -> None:
    name = f"{broker.prefix}.legacy-consumer"
    broker.queues.add(name)
    channel = await broker.connection.channel()
    queue = await channel.declare_queue(
        name, durable=True, arguments={"x-dead-letter-exchange": settings.dead_letter_exchange}
    )
    await channel.default_exchange.publish(
        aio_pika.Message(b"\x00\x01binary", message_id="legacy-1", type="legacy.thing"), name
    )
    message = await queue.get(timeout=5)
    await message.nack(requeue=False)
    await channel.close()
    (letter,) = await letters_when(thief.store, 1)
    assert letter.message_id == "legacy-1"
    assert letter.queue == name
    assert letter.reason == "rejected"
    assert letter.event == "legacy.thing"
    assert letter.exception_type == ""
    assert "requeue=false" in letter.exception_message


async def test_a_crash_loop_on_a_quorum_queue_arrives_as_delivery_limit(
    thief: LetterThief, broker: Broker, settings: Settings
) -> None:
    name = f"{broker.prefix}.crashy"
    broker.queues.add(name)
    channel = await broker.connection.channel()
    queue = await channel.declare_queue(
        name,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": 1,
            "x-dead-letter-exchange": settings.dead_letter_exchange,
            "x-dead-letter-routing-key": name,
        },
    )
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"n": 1}', message_id="poison-1", content_type="application/json"),
        name,
    )
    for _ in range(5):  # the "process" dies holding it: it goes back, again and again
        message = await queue.get(timeout=5, fail=False)
        if message is None:
            break
        await message.nack(requeue=True)
    await channel.close()
    (letter,) = await letters_when(thief.store, 1)
    assert letter.message_id == "poison-1"
    assert letter.queue == name
    assert letter.reason == "delivery-limit"
    assert letter.service == broker.prefix


async def test_an_event_nobody_listens_to_is_collected_as_unrouted(
    thief: LetterThief, make_app: AppFactory, settings: Settings
) -> None:
    app = make_app("orders")
    message_id = await app.dispatch_async("order.lost", {"order_id": "o-1"})
    (letter,) = await letters_when(thief.store, 1)
    assert letter.message_id == message_id
    assert letter.reason == "unrouted"
    assert letter.queue == settings.unrouted_queue
    assert letter.event == "order.lost"
    assert letter.service == app.service
    assert letter.source == "unrouted"
    await app.close()


async def test_the_same_message_failing_twice_is_one_letter_with_two_occurrences(
    thief: LetterThief, make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("billing")

    @app.listener("thing.happened", retry=Retry(attempts=1))
    async def charge(payload: dict[str, object]) -> None:
        raise ValueError("still broken")

    await run_worker(app)
    await app.dispatch_async("thing.happened", {}, message_id="same-1")
    await letters_when(thief.store, 1)
    await app.dispatch_async("thing.happened", {}, message_id="same-1")
    (letter,) = await letters_when(thief.store, 1, occurrences=2)
    assert letter.message_id == "same-1"


async def _line(stream: asyncio.StreamReader, wanted: str, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while True:
            line = await stream.readline()
            if not line:
                raise AssertionError(f"the collector exited before printing {wanted!r}")
            if line.decode().strip() == wanted:
                return


async def test_a_collector_killed_between_receive_and_commit_loses_nothing(
    make_app: AppFactory, settings: Settings, sqlite_url: str
) -> None:
    app = make_app("orders")
    await app.declare()
    env = {**settings_env(settings), "LETTERTHIEF_DATABASE_URL": sqlite_url}
    doomed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.letterthief.stuck_collector",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert doomed.stdout is not None
    try:
        await _line(doomed.stdout, "ready")
        await app.dispatch_async("order.lost", {"order_id": "o-2"}, message_id="kept-1")
        await _line(doomed.stdout, "received")
    finally:
        doomed.kill()  # kill -9 while the letter is received but not committed
        await doomed.wait()
    async with LetterThief(lt_settings(sqlite_url), settings) as second:
        (letter,) = await letters_when(second.store, 1)
        assert letter.message_id == "kept-1"
        assert letter.occurrences == 1
    await app.close()


@pytest.mark.slow
async def test_a_database_outage_stops_acking_until_the_database_is_back(
    make_app: AppFactory, settings: Settings, sqlite_url: str, broker: Broker
) -> None:
    app = make_app("orders")
    await app.declare()
    async with LetterThief(lt_settings(sqlite_url), settings) as thief:
        await asyncio.wait_for(thief.collector.ready.wait(), 20)
        outage = Store(sqlite_url)
        try:
            async with outage.engine.connect() as locker:
                await locker.exec_driver_sql("BEGIN EXCLUSIVE")
                for i in range(3):
                    await app.dispatch_async("order.lost", {"i": i}, message_id=f"wait-{i}")
                await asyncio.sleep(6.5)  # longer than the 5 s busy timeout: a failed commit
                errors = thief.metrics.store_errors._value.get()
                await locker.exec_driver_sql("ROLLBACK")
        finally:
            await outage.close()
        assert errors >= 1
        items = await letters_when(thief.store, 3, Filters(reason="unrouted"), timeout=40)
        assert sorted(i.message_id for i in items) == ["wait-0", "wait-1", "wait-2"]
    assert await broker.count(settings.unrouted_queue) == 0
    await app.close()


async def test_the_collector_reconnects_after_losing_the_broker(
    thief: LetterThief, make_app: AppFactory
) -> None:
    app = make_app("orders")
    connection = await thief.collector.connector.get()
    await connection.close()  # as if the broker dropped it
    await eventually(lambda: thief.collector.ready.is_set(), message="collector reconnected")
    await app.dispatch_async("order.lost", {"order_id": "o-3"}, message_id="after-loss")
    (letter,) = await letters_when(thief.store, 1)
    assert letter.message_id == "after-loss"
    await app.close()


async def test_letters_are_collected_into_either_database(
    database_url: str, settings: Settings, make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("billing")

    @app.listener("thing.happened", retry=Retry(attempts=1))
    async def charge(payload: dict[str, object]) -> None:
        raise ValueError("declined")

    await run_worker(app)
    async with LetterThief(lt_settings(database_url), settings) as thief:
        await asyncio.wait_for(thief.collector.ready.wait(), 20)
        await app.dispatch_async("thing.happened", {"n": 1}, message_id="db-1")
        await app.dispatch_async("thing.happened", {"n": 1}, message_id="db-1")
        (letter,) = await letters_when(thief.store, 1, occurrences=2)
        assert letter.exception_message == "declined"
