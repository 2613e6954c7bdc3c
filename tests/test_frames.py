"""Frames below aiormq: a publish byte for byte what pamqp marshals; deliveries handed
to the worker as their last frame arrives, and nothing that goes wrong there reaching
the connection."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any, cast

import aiormq
import pytest
import structlog
from aiormq.abc import DeliveredMessage
from pamqp import frame as pframe
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from pigeon.dispatch import Outgoing
from pigeon.frames import Deliveries, content, publish_method
from tests.amqp import header, outgoing, properties
from tests.conftest import AppFactory, RunWorker, eventually
from tests.events import OrderPlaced


def pamqp_frames(channel: int, out: Outgoing, max_body: int) -> bytes:
    """What aiormq's basic_publish writes for ``out``: the reference."""
    frames: list[Any] = [
        Basic.Publish(exchange=out.exchange, routing_key=out.routing_key, mandatory=out.mandatory),
        ContentHeader(0, len(out.body), properties(out)),
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
    if not out.headers:
        assert ours == pamqp_frames(3, out, 4088)
    else:  # headers are Pigeon's own encoding (pigeon.tables), which pamqp reads the same
        assert decoded(ours) == decoded(pamqp_frames(3, out, 4088))


def decoded(data: bytes) -> list[Any]:
    frames: list[Any] = []
    while data:
        used, channel, value = pframe.unmarshal(data)
        seen: Any = value
        if isinstance(value, ContentHeader):
            seen = (value.body_size, dict(value.properties))
        elif isinstance(value, ContentBody):
            seen = value.value
        else:
            seen = (type(value).__name__, dict(cast(Any, value)))
        frames.append((channel, seen))
        data = data[used:]
    return frames


def test_a_name_longer_than_amqp_allows_is_refused_with_its_length() -> None:
    with pytest.raises(ValueError, match="the routing key is 300 bytes long; AMQP allows at most"):
        publish_method(1, "x", "k" * 300, mandatory=False)
    with pytest.raises(ValueError, match="the message id is 256 bytes long"):
        content(1, outgoing(message_id="m" * 256), 4088)


def consumer_channel() -> aiormq.Channel:
    """The parts of an aiormq consumer channel a Deliveries touches."""
    frames: asyncio.Queue[Any] = asyncio.Queue()
    return cast(aiormq.Channel, SimpleNamespace(number=7, frames=frames, consumers={"ctag": None}))


def deliver(tag: int, consumer_tag: str = "ctag") -> Basic.Deliver:
    return Basic.Deliver(
        consumer_tag=consumer_tag, delivery_tag=tag, exchange="shop.events", routing_key="k"
    )


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


async def test_a_frame_out_of_place_drops_the_message_it_interrupted_not_the_connection() -> None:
    channel = consumer_channel()
    got: list[DeliveredMessage] = []
    Deliveries(channel, got.append)
    with structlog.testing.capture_logs() as logs:
        for f in (deliver(1), deliver(2), header(1, "two"), ContentBody(b"x")):
            await channel.frames.put((0, f))  # never raises into the connection's reader
    assert [m.delivery_tag for m in got] == [2]
    assert [e["event"] for e in logs] == ["frames.out_of_order"]


async def test_a_failing_consumer_is_logged_and_the_next_delivery_still_arrives() -> None:
    channel = consumer_channel()
    got: list[int] = []

    def on_message(message: DeliveredMessage) -> None:
        if message.delivery_tag == 1:
            raise RuntimeError("consumer bug")
        got.append(message.delivery_tag or 0)

    Deliveries(channel, on_message)
    with structlog.testing.capture_logs() as logs:
        for tag in (1, 2):
            for f in (deliver(tag), header(1, "m"), ContentBody(b"x")):
                await channel.frames.put((0, f))
    assert got == [2]
    assert [(e["event"], e["error"]) for e in logs] == [
        ("frames.callback_failed", "RuntimeError('consumer bug')")
    ]


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
