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
import structlog
from aio_pika.exceptions import ChannelInvalidStateError, PublishError
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import frame as pframe
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from pigeon import DispatchError
from pigeon.connection import Connector
from pigeon.dispatch import Outgoing, Publisher
from pigeon.frames import Deliveries, Publishes, content, publish_method
from tests.conftest import AMQP_URL, AppFactory, Broker, RunWorker, eventually
from tests.events import OrderPlaced


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
    connection = SimpleNamespace(write_queue=write_queue, channels={})
    channel = SimpleNamespace(
        number=5,
        frames=asyncio.Queue(),
        is_closed=closed,
        publisher_confirms=True,
        max_content_size=4088,
        delivery_tag=0,
        confirmations={},
        message_id_delivery_tag={},
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
    publisher = Publisher(connector, timeout=2.0)
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


def consumer_channel() -> aiormq.Channel:
    """The parts of an aiormq consumer channel a Deliveries touches."""
    frames: asyncio.Queue[Any] = asyncio.Queue()
    return cast(aiormq.Channel, SimpleNamespace(number=7, frames=frames, consumers={"ctag": None}))


def deliver(tag: int, consumer_tag: str = "ctag") -> Basic.Deliver:
    return Basic.Deliver(
        consumer_tag=consumer_tag, delivery_tag=tag, exchange="shop.events", routing_key="k"
    )


def header(size: int, message_id: str) -> ContentHeader:
    return ContentHeader(0, size, Basic.Properties(message_id=message_id))


async def test_deliveries_hand_over_each_message_when_its_last_frame_arrives() -> None:
    channel = consumer_channel()
    original = channel.frames
    got: list[DeliveredMessage] = []
    Deliveries(channel, got.append)
    frames: list[Any] = [
        deliver(1),
        header(12, "one"),
        ContentBody(b"hello "),
        ContentBody(b"world!"),
        deliver(2),
        header(0, "empty"),
        deliver(3),
        header(3, "three"),
    ]
    for f in frames:
        await channel.frames.put((0, f))
    assert [(m.delivery_tag, m.body) for m in got] == [(1, b"hello world!"), (2, b"")]
    await channel.frames.put((0, ContentBody(b"abc")))
    assert got[-1].delivery_tag == 3
    assert got[-1].body == b"abc"
    assert got[-1].header.properties.message_id == "three"
    assert got[-1].channel is channel
    assert original.empty(), "deliveries never reach aiormq's reader"


async def test_other_frames_still_reach_aiormqs_reader_in_their_order() -> None:
    channel = consumer_channel()
    got: list[DeliveredMessage] = []
    Deliveries(channel, got.append)
    ok = Basic.ConsumeOk(consumer_tag="ctag")
    cancel = Basic.Cancel(consumer_tag="ctag")
    for f in (ok, deliver(1), header(1, "a"), ContentBody(b"x"), cancel):
        await channel.frames.put((0, f))
    # aiormq's reader takes frames through the same object it was given
    assert await channel.frames.get() == (0, ok)
    channel.frames.task_done()
    assert await channel.frames.get() == (0, cancel)
    assert [m.delivery_tag for m in got] == [1]


async def test_a_delivery_for_a_consumer_the_channel_forgot_is_dropped_with_a_warning() -> None:
    channel = consumer_channel()
    got: list[DeliveredMessage] = []
    Deliveries(channel, got.append)
    with structlog.testing.capture_logs() as logs:
        for f in (deliver(9, consumer_tag="cancelled"), header(1, "a"), ContentBody(b"x")):
            await channel.frames.put((0, f))
    assert got == []
    assert [(e["event"], e["delivery_tag"]) for e in logs] == [("message.unclaimed", 9)]


async def test_a_frame_out_of_place_fails_loudly_rather_than_mixing_two_messages() -> None:
    channel = consumer_channel()
    Deliveries(channel, lambda m: None)
    await channel.frames.put((0, deliver(1)))
    with pytest.raises(ValueError, match="expected a content header"):
        await channel.frames.put((0, deliver(2)))


async def test_a_worker_receives_a_body_of_many_frames_intact(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("notification")
    received: list[OrderPlaced] = []

    @app.listener(OrderPlaced, max_body_bytes=2_000_000)
    async def handle(event: OrderPlaced) -> None:
        received.append(event)

    await run_worker(app)
    big = OrderPlaced(order_id="o-big", customer_email="x" * 1_000_000 + "@example.com")
    small = OrderPlaced(order_id="o-small")
    await app.dispatch_many([big, small])  # one write: the small one follows the big one's frames
    await eventually(lambda: len(received) == 2)
    assert received == [big, small]


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
            await publisher.publish(outgoing(exchange="", routing_key=full.name), timeout=0.3)

    await asyncio.gather(refused(), *(steady(i) for i in range(30)))
    assert lost == [], "the shared connection stayed open"
    assert not connection.is_closed
    assert await broker.wait_count(good.name, 3000) == 3000
