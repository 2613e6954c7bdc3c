"""What used to be written and never read now does its job: RateLimit forgets quiet keys,
and Publisher.close() waits for the channels it reset."""

from __future__ import annotations

import asyncio
import types
from typing import Any, cast

import pytest

from pigeon.connection import Connector
from pigeon.delivery import Delivery
from pigeon.dispatch import Publisher
from pigeon.middleware import RateLimit, rate_limit
from pigeon.retry import RetryLater


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """RateLimit's clock, moved by the test."""
    fake = Clock()
    monkeypatch.setattr(rate_limit, "time", fake)
    return fake


async def _handled(_: Delivery) -> None:
    return None


def _delivery(key: int) -> Delivery:
    return cast(Delivery, types.SimpleNamespace(payload={"customer": key}))


async def test_rate_limit_forgets_a_key_once_its_window_has_passed(clock: Clock) -> None:
    limit = RateLimit(1, per=1.0, key=lambda event: event["customer"])
    for customer in range(1000):
        await limit(_delivery(customer), _handled)
    assert len(limit._calls) == 1000
    clock.now += 1.5  # every window is over
    await limit(_delivery(5000), _handled)
    assert list(limit._calls) == [5000], "one bucket per key ever seen would grow forever"


async def test_rate_limit_still_limits_a_key_within_its_window(clock: Clock) -> None:
    limit = RateLimit(2, per=1.0, key=lambda event: event["customer"])
    await limit(_delivery(1), _handled)
    clock.now += 0.6
    await limit(_delivery(1), _handled)
    for customer in range(2, 12):  # other keys, and a sweep, do not reset key 1
        clock.now += 0.01
        await limit(_delivery(customer), _handled)
    with pytest.raises(RetryLater) as info:
        await limit(_delivery(1), _handled)
    assert info.value.counts is False
    clock.now += 1.0
    await limit(_delivery(1), _handled)


class _Channel:
    def __init__(self) -> None:
        self.is_closed = False
        self.release = asyncio.Event()

    async def close(self) -> None:
        await self.release.wait()
        self.is_closed = True


class _Connector:
    is_open = True
    masked_url = "amqp://127.0.0.1/"

    def invalidate(self) -> None:
        return None


async def test_publisher_close_waits_for_the_channel_a_reset_is_closing() -> None:
    publisher = Publisher(cast(Connector, _Connector()), timeout=1.0)
    channel = _Channel()
    publisher._channel = cast(Any, channel)
    publisher._reset(TimeoutError("no confirm"))
    closing = asyncio.ensure_future(publisher.close())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not closing.done(), "close() returned while the reset channel was still closing"
    channel.release.set()
    await closing
    assert channel.is_closed
