"""Publishes: one write per loop turn in tag order, and every answer (ack, return,
closed channel) reaching the publisher that waits for it, never the wrong one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import aiormq
import pytest
import structlog
from aio_pika.exceptions import ChannelInvalidStateError, PublishError
from aiormq.abc import ChannelFrame
from pamqp import frame as pframe
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from pigeon import DispatchError, DispatchManyError
from pigeon.connection import Connector
from pigeon.dispatch import Publisher
from pigeon.errors import InvalidHeaderError
from pigeon.publishes import Publishes
from tests.amqp import header, outgoing
from tests.conftest import AMQP_URL, Broker


def fake_channel(*, closed: bool = False, queue_size: int = 10) -> aiormq.Channel:
    """The parts of an aiormq channel a Publishes touches, with a write queue the test
    can fill: a socket that does not drain cannot be made to happen on cue."""
    loop = asyncio.get_running_loop()
    write_queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_size)
    connection = SimpleNamespace(write_queue=write_queue, channels={})
    channel = SimpleNamespace(
        number=5,
        frames=asyncio.Queue(),
        is_closed=closed,
        publisher_confirms=True,
        max_content_size=4088,
        delivery_tag=0,
        confirmations={},
        create_future=loop.create_future,
        connection=connection,
    )
    connection.channels[5] = channel
    return cast(aiormq.Channel, channel)


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


async def test_nothing_more_is_written_to_a_channel_whose_close_the_broker_sent() -> None:
    channel = fake_channel()
    publishes = Publishes(channel)
    answer = publishes.send(outgoing())
    channel.connection.channels[5] = None  # aiormq's reader saw the broker's channel.close
    assert not publishes.usable
    with pytest.raises(ChannelInvalidStateError, match="closed before the write"):
        await asyncio.wait_for(answer, 1)
    assert channel.connection.write_queue.qsize() == 0
    with pytest.raises(ChannelInvalidStateError):
        publishes.send(outgoing())


async def test_a_closed_writer_fails_what_it_had_not_written_yet() -> None:
    channel = fake_channel()
    publishes = Publishes(channel)
    answer = publishes.send(outgoing())
    publishes.close()  # a reset: the publisher moves to a new channel
    with pytest.raises(ChannelInvalidStateError):
        await asyncio.wait_for(answer, 1)
    assert channel.connection.write_queue.qsize() == 0


async def test_a_mandatory_message_without_an_id_gets_one_so_its_return_can_find_it() -> None:
    channel = fake_channel()
    publishes = Publishes(channel)
    publishes.send(outgoing(message_id="", mandatory=True))
    await asyncio.sleep(0)
    (header,) = [f for f in written(channel) if isinstance(f, ContentHeader)]
    message_id = header.properties.message_id
    assert message_id is not None
    assert len(message_id) == 32


async def returned(channel: aiormq.Channel, message_id: str, routing_key: str) -> None:
    """The frames of a ``basic.return`` for one message, as the connection's reader puts them."""
    frame = Basic.Return(
        reply_code=312, reply_text="NO_ROUTE", exchange="shop.events", routing_key=routing_key
    )
    for f in (frame, header(2, message_id), ContentBody(b"{}")):
        await channel.frames.put((0, f))


async def test_a_return_fails_the_publish_it_belongs_to_even_when_ids_repeat() -> None:
    """Retry copies of one event for two listeners share its id; only the routing keys differ."""
    channel = fake_channel()
    publishes = Publishes(channel)
    first, second, plain = (
        publishes.send(outgoing(message_id="m-1", routing_key=key, mandatory=mandatory))
        for key, mandatory in (("a.retry", True), ("b.retry", True), ("b.retry", False))
    )
    await returned(channel, "m-1", "b.retry")
    with pytest.raises(PublishError):
        await asyncio.wait_for(second, 1)
    assert not first.done()
    assert not plain.done(), "a publish that was not mandatory is never returned"
    assert type(channel.confirmations[2]).__name__ == "Returning", "the ack that follows is ignored"


async def test_a_mandatory_publish_waits_while_one_with_the_same_id_and_route_is_in_flight() -> (
    None
):
    """A return names only the message id, exchange and routing key: two publishes that
    agree on all three go one at a time, or a return could fail the wrong one."""
    channel = fake_channel()
    publishes = Publishes(channel)
    first = publishes.send(outgoing(message_id="m-1", mandatory=True))
    second = publishes.send(outgoing(message_id="m-1", mandatory=True, body=b"2"))
    other = publishes.send(outgoing(message_id="m-2", mandatory=True))
    await asyncio.sleep(0)
    assert sorted(channel.confirmations) == [1, 2], "the second one is held"
    assert len([f for f in written(channel) if isinstance(f, ContentBody)]) == 2
    channel.confirmations[1].set_result(Basic.Ack(delivery_tag=1))
    assert (await first).delivery_tag == 1
    await asyncio.sleep(0)
    assert sorted(channel.confirmations) == [1, 2, 3], "sent once the first was answered"
    await asyncio.sleep(0)  # the write at the end of that turn
    assert [f.value for f in written(channel) if isinstance(f, ContentBody)] == [b"2"]
    channel.confirmations[3].set_result(Basic.Ack(delivery_tag=3))
    assert (await asyncio.wait_for(second, 1)).delivery_tag == 3
    assert not other.done()


async def test_a_held_publish_fails_when_the_channel_closes_before_its_turn() -> None:
    channel = fake_channel()
    publishes = Publishes(channel)
    first = publishes.send(outgoing(mandatory=True))
    second = publishes.send(outgoing(mandatory=True))
    await asyncio.sleep(0)
    cast(Any, channel).is_closed = True
    channel.confirmations[1].set_exception(ChannelInvalidStateError("closed"))  # as aiormq does
    with pytest.raises(ChannelInvalidStateError):
        await first
    with pytest.raises(ChannelInvalidStateError):
        await asyncio.wait_for(second, 1)


async def test_a_return_nobody_waits_for_is_logged() -> None:
    channel = fake_channel()
    Publishes(channel)
    with structlog.testing.capture_logs() as logs:
        await returned(channel, "m-9", "nowhere")
    assert [(e["event"], e["message_id"]) for e in logs] == [("publish.return_unmatched", "m-9")]


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
    publisher = Publisher(connector, timeout=10.0)
    yield publisher
    await publisher.close()
    await connector.close()


async def exchange_with_queue(broker: Broker, *keys: str) -> tuple[str, str]:
    """A topic exchange and a queue bound to it with ``keys``; their names."""
    channel = await broker.connection.channel()
    exchange = await channel.declare_exchange(f"{broker.prefix}.x", "topic", auto_delete=True)
    queue = await channel.declare_queue(f"{broker.prefix}.q", auto_delete=True)
    for key in keys:
        await queue.bind(exchange, key)
    broker.queues.add(queue.name)
    broker.exchanges.add(exchange.name)
    await channel.close()
    return exchange.name, queue.name


async def test_an_unroutable_mandatory_message_is_returned_and_its_neighbours_confirmed(
    publisher: Publisher, broker: Broker
) -> None:
    exchange, queue = await exchange_with_queue(broker, "routed", "routed-too")
    publishes = await publisher._publishes()
    answers = [
        publishes.send(outgoing(exchange=exchange, routing_key=key, message_id=key, mandatory=True))
        for key in ("routed", "nowhere", "routed-too")
    ]
    first, unroutable, last = await asyncio.gather(*answers, return_exceptions=True)
    assert isinstance(first, Basic.Ack)
    assert isinstance(unroutable, PublishError)
    assert isinstance(last, Basic.Ack)
    assert await broker.count(queue) == 2

    same_id = [  # the unroutable one first, then a routable one with the same id
        publishes.send(outgoing(exchange=exchange, routing_key=key, mandatory=True))
        for key in ("nowhere", "routed")
    ]
    unroutable, routed = await asyncio.gather(*same_id, return_exceptions=True)
    assert isinstance(unroutable, PublishError)
    assert isinstance(routed, Basic.Ack)
    assert await broker.wait_count(queue, 3) == 3

    with pytest.raises(DispatchError, match="returned it as unroutable"):
        await publisher.publish(outgoing(exchange=exchange, routing_key="nowhere", mandatory=True))


async def test_a_channel_the_broker_closes_fails_its_publishes_and_the_next_ones_get_a_new_one(
    publisher: Publisher, broker: Broker
) -> None:
    exchange, queue = await exchange_with_queue(broker, "#")
    missing = outgoing(exchange=f"{broker.prefix}.missing", message_id="lost")
    publishes = await publisher._publishes()
    answer = publishes.send(missing)  # the broker closes the channel: 404 NOT_FOUND
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await asyncio.wait_for(answer, 5)

    good = [outgoing(exchange=exchange, message_id=f"ok-{i}") for i in range(50)]
    assert await publisher.publish_many(good) == [f"ok-{i}" for i in range(50)]
    assert await broker.wait_count(queue, 50) == 50
    assert (await publisher._publishes()) is not publishes


async def test_a_refused_publish_does_not_cost_the_connection_its_consumers(
    publisher: Publisher, broker: Broker
) -> None:
    """A nack resets the publishing channel while other publishes are in flight; none of
    them may reach the closing channel (RabbitMQ would close the whole connection)."""
    channel = await broker.connection.channel()
    good = await channel.declare_queue(f"{broker.prefix}.good", auto_delete=True)
    full = await channel.declare_queue(
        f"{broker.prefix}.full",
        auto_delete=True,
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    broker.queues |= {good.name, full.name}
    connection = await publisher.connector.get()
    lost: list[object] = []
    connection.close_callbacks.add(lambda *args: lost.append(args))

    async def steady(i: int) -> None:
        for j in range(100):
            await publisher.publish(
                outgoing(exchange="", routing_key=good.name, message_id=f"{i}-{j}")
            )

    async def refused() -> None:
        await asyncio.sleep(0.05)
        with pytest.raises(DispatchError, match="refused it"):
            await publisher.publish(outgoing(exchange="", routing_key=full.name), timeout=1.0)

    await asyncio.gather(refused(), *(steady(i) for i in range(30)))
    assert lost == [], "the shared connection stayed open"
    assert not connection.is_closed
    # A publish whose confirm went with the reset channel is published again: at least
    # once, so a copy may arrive twice, but every message arrives.
    await broker.wait_count(good.name, 3000)
    ids: set[str | None] = set()
    while (message := await good.get(no_ack=True, fail=False)) is not None:
        ids.add(message.message_id)
    assert ids == {f"{i}-{j}" for i in range(30) for j in range(100)}


async def test_of_two_publishes_alike_but_for_their_headers_only_the_unroutable_one_fails(
    publisher: Publisher, broker: Broker
) -> None:
    """A headers exchange routes on what a return does not show: same id, same route."""
    channel = await broker.connection.channel()
    exchange = await channel.declare_exchange(f"{broker.prefix}.h", "headers", auto_delete=True)
    queue = await channel.declare_queue(f"{broker.prefix}.hq", auto_delete=True)
    await queue.bind(exchange, arguments={"x-match": "all", "k": "yes"})
    broker.queues.add(queue.name)
    broker.exchanges.add(exchange.name)
    publishes = await publisher._publishes()
    routable, unroutable = (
        publishes.send(
            outgoing(exchange=exchange.name, message_id="same", headers={"k": k}, mandatory=True)
        )
        for k in ("yes", "no")
    )
    assert isinstance(await asyncio.wait_for(routable, 5), Basic.Ack)
    with pytest.raises(PublishError):
        await asyncio.wait_for(unroutable, 5)
    assert await broker.count(queue.name) == 1


async def test_a_cancelled_caller_does_not_end_its_publish_nor_release_the_next_early() -> None:
    """A return for the first publish must still find the first, not the one held behind it."""
    channel = fake_channel()
    publishes = Publishes(channel)
    first = publishes.send(outgoing(message_id="m-1", routing_key="r", mandatory=True))
    second = publishes.send(outgoing(message_id="m-1", routing_key="r", mandatory=True))
    await asyncio.sleep(0)
    first.cancel()  # its caller timed out
    await asyncio.sleep(0)
    assert sorted(channel.confirmations) == [1], "the second stays held"
    publish = channel.confirmations[1]
    assert not publish.done(), "the publish itself goes on"
    await returned(channel, "m-1", "r")
    with pytest.raises(PublishError):
        await asyncio.wait_for(publish, 1)
    await asyncio.sleep(0)
    assert sorted(channel.confirmations) == [1, 2], "the second goes once the first is answered"
    assert not second.done()


async def test_a_batch_publishes_everything_it_can_before_raising_for_a_bad_message(
    publisher: Publisher, broker: Broker
) -> None:
    exchange, queue = await exchange_with_queue(broker, "#")
    batch = [outgoing(exchange=exchange, message_id=f"m-{i}") for i in range(250)]
    batch[150] = outgoing(exchange=exchange, message_id="bad", headers={"raw": object()})
    with pytest.raises(DispatchManyError, match="raw") as caught:
        await publisher.publish_many(batch, chunk=100)
    assert caught.value.unconfirmed == ["bad"]
    assert len(caught.value.confirmed) == 249
    assert isinstance(caught.value.__cause__, InvalidHeaderError)
    assert await broker.wait_count(queue, 249) == 249, "all but the one that cannot be encoded"
