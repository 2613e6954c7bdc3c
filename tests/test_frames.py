"""Publish frames: byte for byte what pamqp marshals, one write per loop turn, every
answer (ack, return, closed channel) reaching the publisher that waits for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any, cast

import aiormq
import pytest
from aio_pika.exceptions import ChannelInvalidStateError, PublishError
from aiormq.abc import ChannelFrame
from pamqp import frame as pframe
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from pigeon import DispatchError
from pigeon.connection import Connector
from pigeon.dispatch import Outgoing, Publisher
from pigeon.frames import Publishes, content, publish_method
from tests.conftest import AMQP_URL, Broker


def outgoing(**overrides: Any) -> Outgoing:
    values: dict[str, Any] = {
        "exchange": "shop.events",
        "routing_key": "order.placed",
        "body": b'{"order_id":"42"}',
        "message_id": "6f1c0d1e-2c7b-4d8e-9a55-3f1b9a7c0e21",
        "event_name": "order.placed",
        "headers": {"x-pigeon-version": 2, "x-causation-id": "c-1"},
        "correlation_id": "corr-42",
        "app_id": "orders",
        "timestamp": datetime(2026, 12, 2, 4, 13, 47, 512_000, tzinfo=UTC),
    }
    values.update(overrides)
    return Outgoing(**values)


def pamqp_frames(channel: int, out: Outgoing, max_body: int) -> bytes:
    """What aiormq's basic_publish writes for ``out``: the reference."""
    frames: list[Any] = [
        Basic.Publish(exchange=out.exchange, routing_key=out.routing_key, mandatory=out.mandatory),
        ContentHeader(0, len(out.body), out.to_properties()),
    ]
    frames += [ContentBody(out.body[i : i + max_body]) for i in range(0, len(out.body), max_body)]
    return b"".join(pframe.marshal(f, channel) for f in frames)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"headers": {}},
        {
            "headers": {
                "nested": {"a": [1, "two", 3.5, True, None]},
                "big": 2**40,
                "neg": -70_000,
                "when": datetime(2026, 1, 1, tzinfo=UTC),
            }
        },
        {"content_encoding": "gzip", "content_type": "application/x-msgpack"},
        {"correlation_id": None, "app_id": None, "timestamp": None},
        {"timestamp": datetime(2026, 12, 2, 4, 13, 47)},  # naive: read as UTC
        {"timestamp": datetime(2026, 12, 2, 5, 13, 47, tzinfo=timezone(timedelta(hours=1)))},
        {"event_name": "pedido.recebido.ção", "routing_key": "pedido.recebido.ção"},
        {"mandatory": True, "exchange": ""},
        {"body": b""},
        {"body": bytes(range(256)) * 40},  # three body frames of at most 4,088 bytes
        {"body": b"x" * 4088},  # exactly one full frame
    ],
    ids=lambda c: ",".join(c) or "defaults",
)
def test_publish_frames_are_byte_for_byte_what_pamqp_marshals(changes: dict[str, Any]) -> None:
    out = outgoing(**changes)
    ours = publish_method(3, out.exchange, out.routing_key, mandatory=out.mandatory)
    ours += content(3, out, 4088)
    assert ours == pamqp_frames(3, out, 4088)


def test_a_name_longer_than_amqp_allows_is_refused_with_its_length() -> None:
    with pytest.raises(ValueError, match="the routing key is 300 bytes long; AMQP allows at most"):
        publish_method(1, "x", "k" * 300, mandatory=False)
    with pytest.raises(ValueError, match="the message id is 256 bytes long"):
        content(1, outgoing(message_id="m" * 256), 4088)


def fake_channel(*, closed: bool = False, queue_size: int = 10) -> aiormq.Channel:
    """The parts of an aiormq channel a Publishes touches, with a write queue the test
    can fill: a socket that does not drain cannot be made to happen on cue."""
    loop = asyncio.get_running_loop()
    write_queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_size)
    return cast(
        aiormq.Channel,
        SimpleNamespace(
            number=5,
            is_closed=closed,
            publisher_confirms=True,
            max_content_size=4088,
            delivery_tag=0,
            confirmations={},
            message_id_delivery_tag={},
            create_future=loop.create_future,
            connection=SimpleNamespace(write_queue=write_queue),
        ),
    )


def written(channel: aiormq.Channel) -> list[Any]:
    """The frames of every payload in the write queue, decoded."""
    frames: list[Any] = []
    queue = channel.connection.write_queue
    while not queue.empty():
        payload = queue.get_nowait()
        assert isinstance(payload, ChannelFrame)
        data = payload.payload
        while data:
            consumed, number, decoded = pframe.unmarshal(data)
            assert number == 5
            frames.append(decoded)
            data = data[consumed:]
    return frames


async def test_everything_published_in_one_loop_turn_leaves_as_one_payload_in_tag_order() -> None:
    channel = fake_channel()
    publishes = Publishes(channel)
    answers = [publishes.send(outgoing(message_id=f"m-{i}")) for i in range(300)]
    assert sorted(channel.confirmations) == list(range(1, 301))
    assert channel.connection.write_queue.qsize() == 0, "written at the end of the turn"
    await asyncio.sleep(0)
    assert channel.connection.write_queue.qsize() == 1
    frames = written(channel)
    headers = [f for f in frames if isinstance(f, ContentHeader)]
    assert [h.properties.message_id for h in headers] == [f"m-{i}" for i in range(300)]
    assert sum(isinstance(f, Basic.Publish) for f in frames) == 300
    assert not any(a.done() for a in answers), "answered by the broker, not by the write"


async def test_publishes_wait_for_room_in_a_backed_up_write_queue() -> None:
    channel = fake_channel(queue_size=1)
    channel.connection.write_queue.put_nowait(object())  # the socket is behind
    publishes = Publishes(channel)
    publishes.send(outgoing(message_id="a"))
    await asyncio.sleep(0.02)
    publishes.send(outgoing(message_id="b"))  # joins the payload that waits
    await asyncio.sleep(0.02)
    assert channel.connection.write_queue.qsize() == 1, "nothing written while it is full"
    channel.connection.write_queue.get_nowait()  # the socket caught up
    await asyncio.sleep(0.02)
    ids = [f.properties.message_id for f in written(channel) if isinstance(f, ContentHeader)]
    assert ids == ["a", "b"]


async def test_publishes_for_a_channel_that_closed_before_the_write_fail_and_are_not_written() -> (
    None
):
    channel = fake_channel(queue_size=1)
    channel.connection.write_queue.put_nowait(object())
    publishes = Publishes(channel)
    answer = publishes.send(outgoing())
    await asyncio.sleep(0.02)
    cast(Any, channel).is_closed = True  # closed while the payload waited for room
    with pytest.raises(ChannelInvalidStateError, match="closed before the write"):
        await asyncio.wait_for(answer, 1)
    assert channel.connection.write_queue.qsize() == 1, "nothing written to a closed channel"
    with pytest.raises(ChannelInvalidStateError):
        publishes.send(outgoing())
    assert channel.delivery_tag == 1, "a refused send takes no delivery tag"


async def test_a_message_that_cannot_be_encoded_takes_no_delivery_tag() -> None:
    channel = fake_channel()
    publishes = Publishes(channel)
    with pytest.raises(ValueError, match="the event name is"):
        publishes.send(outgoing(event_name="e" * 256))
    assert channel.delivery_tag == 0
    assert channel.confirmations == {}


@pytest.fixture
async def publisher() -> AsyncIterator[Publisher]:
    connector = Connector(AMQP_URL, name="test-frames")
    publisher = Publisher(connector, timeout=2.0)
    yield publisher
    await publisher.close()
    await connector.close()


async def test_an_unroutable_mandatory_message_is_returned_and_its_neighbours_confirmed(
    publisher: Publisher, broker: Broker
) -> None:
    channel = await broker.connection.channel()
    exchange = await channel.declare_exchange(f"{broker.prefix}.x", "topic", auto_delete=True)
    queue = await channel.declare_queue(f"{broker.prefix}.q", auto_delete=True)
    await queue.bind(exchange, "routed")
    await queue.bind(exchange, "routed-too")
    broker.queues.add(queue.name)
    broker.exchanges.add(exchange.name)
    publishes = await publisher._publishes()
    answers = [
        publishes.send(
            outgoing(exchange=exchange.name, routing_key=key, message_id=key, mandatory=True)
        )
        for key in ("routed", "nowhere", "routed-too")
    ]
    first, returned, last = await asyncio.gather(*answers, return_exceptions=True)
    assert isinstance(first, Basic.Ack)
    assert isinstance(returned, PublishError)
    assert isinstance(last, Basic.Ack)
    assert await broker.count(queue.name) == 2

    with pytest.raises(DispatchError, match="returned it as unroutable"):
        await publisher.publish(
            outgoing(exchange=exchange.name, routing_key="nowhere", mandatory=True)
        )


async def test_a_channel_the_broker_closes_fails_its_publishes_and_the_next_ones_get_a_new_one(
    publisher: Publisher, broker: Broker
) -> None:
    channel = await broker.connection.channel()
    exchange = await channel.declare_exchange(f"{broker.prefix}.x", "topic", auto_delete=True)
    queue = await channel.declare_queue(f"{broker.prefix}.q", auto_delete=True)
    await queue.bind(exchange, "#")
    broker.queues.add(queue.name)
    broker.exchanges.add(exchange.name)
    missing = outgoing(exchange=f"{broker.prefix}.missing", message_id="lost")
    publishes = await publisher._publishes()
    answer = publishes.send(missing)  # the broker closes the channel: 404 NOT_FOUND
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await asyncio.wait_for(answer, 5)

    good = [outgoing(exchange=exchange.name, message_id=f"ok-{i}") for i in range(50)]
    assert await publisher.publish_many(good) == [f"ok-{i}" for i in range(50)]
    assert await broker.wait_count(queue.name, 50) == 50
    assert (await publisher._publishes()) is not publishes
