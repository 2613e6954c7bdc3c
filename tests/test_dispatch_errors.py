"""What a DispatchError means: raised by the deadline, and it may have been stored."""

from __future__ import annotations

import time

import pytest
from structlog.testing import capture_logs

from pigeon import DispatchError, DispatchManyError, Pigeon
from tests.conftest import Broker, unique_settings
from tests.tcpproxy import TcpProxy


async def test_an_outage_raises_by_the_deadline_and_says_the_event_may_be_stored(
    prefix: str,
) -> None:
    proxy = TcpProxy()
    await proxy.start()
    await proxy.stop()  # the broker is unreachable through it from now on
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    app = Pigeon(service="orders", settings=unique_settings(prefix, url=url, dispatch_timeout=5))
    started = time.monotonic()
    with capture_logs() as logs, pytest.raises(DispatchError) as caught:
        await app.dispatch_async("test.order.placed", {}, message_id="m-deadline")
    elapsed = time.monotonic() - started
    await app.close()
    sleeps = [e["retry_in"] for e in logs if e["event"] == "dispatch.retrying"]
    assert len(sleeps) >= 3
    assert sum(sleeps) <= 5.0, "no backoff sleep runs past the deadline"
    assert elapsed < 7.0, "a generous bound: the old code took 7.6-8.0 s"
    assert "may have been stored; retry with the same message id (m-deadline)" in str(caught.value)


async def test_dispatch_many_takes_ids_and_names_the_ones_confirmed(
    prefix: str, broker: Broker
) -> None:
    settings = unique_settings(prefix, unrouted_max_length=1, dispatch_timeout=1.0)
    broker.track(settings)
    app = Pigeon(service="orders", settings=settings)
    broker.apps.append(app)
    await app.declare()
    channel = await broker.connection.channel()
    kept = await channel.declare_queue(f"{prefix}.kept")
    broker.queues.add(kept.name)
    await kept.bind(settings.exchange, "test.kept")
    with pytest.raises(DispatchError):  # noqa: PT012 - fill pigeon.unrouted until it refuses
        for n in range(50):
            await app.dispatch_async("test.nobody.listens", {"n": n})
    ids = [f"batch-{n}" for n in range(20)]
    events = [("test.kept" if n % 2 else "test.nobody.listens", {"n": n}) for n in range(20)]
    with pytest.raises(DispatchManyError) as caught:
        await app.dispatch_many(events, message_ids=ids)
    error = caught.value
    assert error.confirmed == ids[1::2]
    assert error.unconfirmed == ids[0::2]
    assert "batch-0" in str(error)
    assert "may have been stored" in str(error)
    assert await broker.count(kept.name) == 10


async def test_dispatch_many_wants_one_id_per_event(prefix: str) -> None:
    app = Pigeon(service="orders", settings=unique_settings(prefix))
    with pytest.raises(ValueError, match="2 events and 1 message_ids"):
        await app.dispatch_many([("a.b", {}), ("a.c", {})], message_ids=["only-one"])
