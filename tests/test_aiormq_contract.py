"""The contract between Pigeon's fast path and the aiormq it is pinned to.

The worker takes deliveries straight off an aiormq channel's frame queue
(:func:`pigeon.frames.attach_deliveries`), and the acks and publishes write to
its connection's write queue. None of that is aiormq's public API, so these
tests drive it against the real aiormq classes and a real broker, and fail
loudly, naming the aiormq version, when it no longer fits: update
``pigeon/amqp/frames.py`` (and the pin in pyproject.toml) together.
"""

from __future__ import annotations

import asyncio
import tomllib
import types
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import aiormq
import pytest
import structlog
from aiormq.abc import DeliveredMessage
from packaging.requirements import Requirement

from pigeon.acks import Acker
from pigeon.frames import attach_deliveries
from tests import leaks
from tests.conftest import AMQP_URL

AIORMQ = metadata.version("aiormq")
ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_aiormq_is_the_one_pyproject_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [Requirement(r) for r in project["dependencies"] if r.startswith("aiormq")]
    assert pins, "pyproject.toml pins aiormq below its next minor"
    assert pins[0].specifier.contains(AIORMQ), f"aiormq {AIORMQ} is outside {pins[0]}"
    assert any(s.operator == "<" for s in pins[0].specifier), "an upper bound is the point"


@pytest.fixture
async def channel() -> AsyncIterator[aiormq.abc.AbstractChannel]:
    connection = await aiormq.connect(AMQP_URL)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


async def test_the_fast_path_attaches_to_a_real_aiormq_channel_and_takes_its_deliveries(
    channel: aiormq.abc.AbstractChannel,
) -> None:
    queue = f"{leaks.new_prefix(__name__)}.contract"
    await channel.queue_declare(queue, exclusive=True, auto_delete=True)
    fast: list[DeliveredMessage] = []
    slow: list[DeliveredMessage] = []

    async def through_aiormq(message: DeliveredMessage) -> None:
        slow.append(message)

    attached = attach_deliveries(channel, fast.append, queue=queue)
    assert attached, (
        f"the fast path cannot attach to aiormq {AIORMQ}: pigeon/amqp/frames.py no longer "
        "fits its channel; fix it before moving the aiormq pin"
    )
    ok = await channel.basic_consume(queue, through_aiormq)
    body = b'{"order_id": "o-1"}' * 1000  # larger than one frame: assembled from several
    await channel.basic_publish(
        body, routing_key=queue, properties=aiormq.spec.Basic.Properties(message_id="m-1")
    )
    async with asyncio.timeout(10):
        while not fast:
            await asyncio.sleep(0.01)
    message = fast[0]
    assert (message.body, message.header.properties.message_id) == (body, "m-1")
    assert isinstance(message.delivery, aiormq.spec.Basic.Deliver)
    assert message.delivery.consumer_tag == ok.consumer_tag
    assert slow == [], "the message went through aiormq's own consumer, not the fast path"
    acker = Acker(channel, queue)
    assert message.delivery_tag is not None
    acker.delivered(message.delivery_tag)
    acker.ack(message.delivery_tag)
    await acker.close()
    async with asyncio.timeout(10):  # acked: the queue is empty once the ack is processed
        while (await channel.queue_declare(queue, passive=True)).message_count:
            await asyncio.sleep(0.01)
    assert ok.consumer_tag is not None
    await channel.basic_cancel(ok.consumer_tag)


def test_the_worker_logs_when_the_fast_path_cannot_attach() -> None:
    not_aiormq = cast(Any, types.SimpleNamespace(number=1, frames=None))
    with structlog.testing.capture_logs() as logs:
        attached = attach_deliveries(not_aiormq, lambda message: None, queue="orders.x")
    assert attached is False
    assert [log["event"] for log in logs] == ["worker.fast_path_unavailable"]
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["queue"] == "orders.x"
    assert logs[0]["aiormq"] == AIORMQ
    assert "frame queue" in logs[0]["error"]
