"""Settling is bounded: a dead connection cannot hold a message, or a drain, forever."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import structlog
from aiormq.abc import AbstractChannel, ChannelFrame
from pamqp import frame
from pamqp.commands import Basic

from pigeon import Pigeon, settle
from pigeon.acks import Acker
from pigeon.delivery import Delivery, Outcome, OutcomeKind
from tests.events import OrderPlaced


def stuck_channel() -> AbstractChannel:
    """What aiormq looks like when its connection died mid-write: the channel still
    reports open, and its write queue is full and never drained. (A hang cannot be made
    to happen on cue with a real broker, so it is simulated.)"""
    write_queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
    write_queue.put_nowait(object())
    connection = SimpleNamespace(write_queue=write_queue)
    return cast(AbstractChannel, SimpleNamespace(is_closed=False, number=1, connection=connection))


async def test_settling_on_a_stuck_connection_returns_and_closing_gives_up_in_time() -> None:
    app = Pigeon(service="svc")

    @app.listener(OrderPlaced)
    async def handle(event: OrderPlaced) -> None: ...

    settler = settle.Settler(app, app.runtime(), [handle])
    delivery = Delivery.create(
        handle, b"{}", event_name="test.order.placed", message_id="m-1", headers={}
    )
    acker = Acker(stuck_channel(), handle.queue)
    acker.delivered(7)
    settled = await asyncio.wait_for(
        settler.settle(acker, 7, delivery, Outcome(OutcomeKind.ACKED, 1)), 1
    )
    assert settled is True
    await asyncio.sleep(0)  # the loop turn that tries to write the ack
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(acker.close(timeout=0.2), 30)  # gives up: never hangs
    assert [e["count"] for e in logs if e["event"] == "message.ack_lost"] == [1], logs
    await app.close()


async def test_a_give_back_on_a_stuck_connection_is_reported_lost_not_hung() -> None:
    acker = Acker(stuck_channel(), "svc.handle")
    for tag in (1, 2, 3):
        acker.delivered(tag)
        acker.give_back(tag)
    await asyncio.sleep(0)
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(acker.close(timeout=0.2), 30)  # gives up: never hangs
    assert [e["count"] for e in logs if e["event"] == "message.ack_lost"] == [3]


async def test_acks_for_a_closed_channel_are_dropped_with_a_warning() -> None:
    channel = stuck_channel()
    cast(Any, channel).is_closed = True
    acker = Acker(channel, "svc.handle")
    acker.delivered(1)
    with structlog.testing.capture_logs() as logs:
        acker.ack(1)
        await asyncio.sleep(0)
    assert [e["error"] for e in logs if e["event"] == "message.ack_lost"] == ["channel closed"]
    assert acker.unsettled == 0


async def test_acks_wait_for_room_in_a_backed_up_write_queue_and_then_leave() -> None:
    channel = stuck_channel()
    write_queue = channel.connection.write_queue
    acker = Acker(channel, "svc.handle")
    for tag in (1, 2):
        acker.delivered(tag)
        acker.ack(tag)
    await asyncio.sleep(0.02)
    assert write_queue.qsize() == 1, "nothing is written while the queue is full"
    write_queue.get_nowait()  # the socket caught up
    await asyncio.sleep(0.02)
    payload = write_queue.get_nowait()
    assert isinstance(payload, ChannelFrame)
    _, channel_number, ack = frame.unmarshal(payload.payload)
    assert channel_number == 1
    assert isinstance(ack, Basic.Ack)
    assert (ack.delivery_tag, ack.multiple) == (2, True)
    assert acker.unsettled == 0


async def test_acks_waiting_for_room_are_dropped_when_their_channel_closes() -> None:
    channel = stuck_channel()
    acker = Acker(channel, "svc.handle")
    acker.delivered(1)
    with structlog.testing.capture_logs() as logs:
        acker.ack(1)
        await asyncio.sleep(0.02)
        cast(Any, channel).is_closed = True  # closed while the queue was still full
        await asyncio.sleep(0.02)
    assert [e["error"] for e in logs if e["event"] == "message.ack_lost"] == ["channel closed"]
    assert channel.connection.write_queue.qsize() == 1, "nothing written to a closed channel"
