"""The end-of-run broker check (tests/leaks.py) finds a leak, deletes it, and touches nothing
that no test of this run made."""

from __future__ import annotations

import asyncio
import os

import aio_pika
import pytest

from tests import leaks
from tests.conftest import AMQP_URL, Broker, open_broker, unique_settings


def test_a_name_belongs_to_the_test_whose_prefix_starts_it() -> None:
    known = {"t0123456789": "test_a", "doc0123456789": "test_b"}
    assert leaks.owner_of("t0123456789.events", known) == "test_a"
    assert leaks.owner_of("t0123456789-recorder.record.retry.200ms", known) == "test_a"
    assert leaks.owner_of("t0123456789", known) == "test_a"
    assert leaks.owner_of("doc0123456789_x", known) == "test_b"
    assert leaks.owner_of("t01234567890.events", known) is None  # a longer prefix: not ours
    assert leaks.owner_of("pigeon.events", known) is None
    assert leaks.owner_of("xt0123456789.events", known) is None


def test_every_prefix_is_new_and_remembered_with_its_test() -> None:
    first, second = leaks.new_prefix("test_x"), leaks.new_prefix("test_x")
    assert first != second
    assert leaks.PREFIXES[first] == leaks.PREFIXES[second] == "test_x"


@pytest.mark.skipif(
    os.environ.get("PIGEON_TEST_LEAK_CHECK") == "0", reason="the leak check is turned off"
)
async def test_the_check_deletes_and_reports_a_leak_and_leaves_other_names_alone(
    broker: Broker,
) -> None:
    leaked = leaks.new_prefix("test_leaky")
    foreign = f"{broker.prefix}.not-in-this-check"  # made by "another run": not to be touched
    channel = await broker.connection.channel()
    broker.queues.add(foreign)
    await channel.declare_queue(f"{leaked}-svc.record.retry.200ms", durable=True)
    await channel.declare_queue(foreign, durable=True)
    await channel.declare_exchange(f"{leaked}.events", "topic", durable=True)
    await channel.close()

    report = await _check({leaked: "test_leaky"})

    assert report.error == ""
    assert report.queues == {f"{leaked}-svc.record.retry.200ms": "test_leaky"}
    assert report.exchanges == {f"{leaked}.events": "test_leaky"}
    assert report.failed
    assert f"leaked queue {leaked}-svc.record.retry.200ms (from test_leaky); deleted" in (
        report.lines()
    )
    assert await broker.count(foreign) == 0  # still there (a missing queue would raise)
    again = await _check({leaked: "test_leaky"})
    assert not again.failed, again.lines()


async def test_a_check_that_cannot_see_the_broker_fails_instead_of_passing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PIGEON_TEST_NODE", "nobody-here@localhost")
    report = await _check({})
    assert report.failed
    assert "PIGEON_TEST_NODE" in report.lines()[0]


async def _check(prefixes: dict[str, str]) -> leaks.Report:
    return await asyncio.to_thread(leaks.check, AMQP_URL, prefixes)


async def test_the_broker_fixture_deletes_a_tests_core_names_even_if_it_never_tracked_them(
    prefix: str,
) -> None:
    """A test that dispatched on its settings and then failed: nothing left behind."""
    settings = unique_settings(prefix)
    async with open_broker(prefix) as broker:
        channel = await broker.connection.channel()
        await channel.declare_exchange(settings.exchange, "topic", durable=True)
        await channel.declare_queue(settings.dead_letter_queue, durable=True)
        await channel.declare_queue(f"{prefix}-svc.work", durable=True)
        broker.queues.add(f"{prefix}-svc.work")
        await channel.declare_queue(f"{prefix}-svc.work.retry.200ms", durable=True)
        await channel.close()
    connection = await aio_pika.connect(AMQP_URL)
    try:
        for queue in (settings.dead_letter_queue, f"{prefix}-svc.work.retry.200ms"):
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(queue, passive=True)
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.get_exchange(settings.exchange, ensure=True)
    finally:
        await connection.close()


@pytest.mark.skipif(
    os.environ.get("PIGEON_TEST_LEAK_CHECK") == "0", reason="the leak check is turned off"
)
async def test_a_private_vhost_is_usable_and_gone_after_and_a_leaked_one_is_reported() -> None:
    with leaks.private_vhost(AMQP_URL, "test_vhosts") as url:
        name = url.rsplit("/", 1)[1]
        connection = await aio_pika.connect(url)
        channel = await connection.channel()
        await channel.declare_queue("pigeon.events-like-fixed-name", durable=True)
        await connection.close()
        assert name in _vhosts()
    assert name not in _vhosts()

    leaked = leaks.new_prefix("test_vhosts")
    leaks.ctl("add_vhost", leaked)
    report = await _check({leaked: "test_vhosts"})
    assert report.vhosts == {leaked: "test_vhosts"}
    assert leaked not in _vhosts()


def _vhosts() -> list[str]:
    return leaks.ctl("list_vhosts", "--no-table-headers", "name").split()
