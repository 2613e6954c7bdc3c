"""Settling on the broker is bounded: a dead connection cannot hold a message forever."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import cast

import pytest
from aiormq.abc import DeliveredMessage

from pigeon import Pigeon, settle
from pigeon.delivery import Delivery, Outcome, OutcomeKind
from tests.events import OrderPlaced


class HungChannel:
    """What aiormq gives when the connection died mid-write: the frame never drains.
    (A hang cannot be made to happen on cue with a real broker, so it is simulated.)"""

    async def basic_ack(self, delivery_tag: int) -> None:
        await asyncio.sleep(3600)

    async def basic_nack(self, delivery_tag: int, requeue: bool = True) -> None:
        await asyncio.sleep(3600)


def hung_message() -> DeliveredMessage:
    return cast(DeliveredMessage, SimpleNamespace(delivery_tag=7, channel=HungChannel()))


async def test_an_ack_that_never_drains_gives_up_after_the_settle_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settle, "SETTLE_TIMEOUT", 0.2)
    app = Pigeon(service="svc")

    @app.listener(OrderPlaced)
    async def handle(event: OrderPlaced) -> None: ...

    settler = settle.Settler(app, app.runtime(), [handle])
    delivery = Delivery.create(
        handle, b"{}", event_name="test.order.placed", message_id="m-1", headers={}
    )
    started = time.monotonic()
    settled = await settler.settle(hung_message(), delivery, Outcome(OutcomeKind.ACKED, 1))
    assert settled is False, "reported as not settled: the redelivery is a known duplicate"
    assert time.monotonic() - started < 2
    await app.close()


async def test_giving_back_a_message_on_a_dead_connection_does_not_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settle, "SETTLE_TIMEOUT", 0.2)
    started = time.monotonic()
    await settle.give_back(hung_message())
    assert time.monotonic() - started < 2
