"""Dispatch guarantees: confirmed, never silently dropped, safe from threads and forks."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator

import pytest

import pigeon
from pigeon import DispatchError, Pigeon
from pigeon.app import set_default_app
from pigeon.settings import mask_url
from tests.conftest import AppFactory, Broker, unique_settings
from tests.events import OrderPlaced


@pytest.fixture
async def tap(make_app: AppFactory, broker: Broker) -> AsyncIterator[tuple[Pigeon, str]]:
    """An app plus a plain queue bound to every event on its exchange."""
    app = make_app("orders")
    await app.declare()
    channel = await broker.connection.channel()
    queue = await channel.declare_queue(f"{broker.prefix}.tap", durable=False, auto_delete=False)
    broker.queues.add(queue.name)
    await queue.bind(app.settings.exchange, "#")
    yield app, queue.name
    await app.close()


def _drain_ids(broker: Broker, queue: str, expected: int) -> set[str]:
    async def collect() -> set[str]:
        ids: set[str] = set()
        deadline = time.monotonic() + 30
        while len(ids) < expected and time.monotonic() < deadline:
            try:
                message = await broker.get(queue, timeout=5)
            except AssertionError:
                break
            ids.add(message.message_id or "")
        return ids

    return asyncio.get_event_loop().run_until_complete(collect())


async def test_dispatch_returns_the_given_message_id_after_the_confirm(
    tap: tuple[Pigeon, str], broker: Broker
) -> None:
    app, queue = tap
    message_id = await app.dispatch_async(OrderPlaced(order_id="o-1"), message_id="my-id-1")
    assert message_id == "my-id-1"
    assert await broker.count(queue) == 1, "confirmed means routed and stored before we return"


async def test_sync_dispatch_from_eight_threads_at_once(
    tap: tuple[Pigeon, str], broker: Broker
) -> None:
    app, queue = tap
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            for i in range(50):
                mid = app.dispatch("test.order.placed", {"order_id": f"{n}-{i}"})
                with lock:
                    ids.append(mid)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]

    def run_all() -> None:
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    await asyncio.to_thread(run_all)
    assert errors == []
    assert len(set(ids)) == 400
    assert await broker.wait_count(queue, 400) == 400


async def test_sync_dispatch_works_in_a_forked_child(
    tap: tuple[Pigeon, str], broker: Broker
) -> None:
    app, queue = tap
    await asyncio.to_thread(app.dispatch, "test.order.placed", {"order_id": "parent-1"})
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's connection and loop thread are not usable here
        os.close(read)
        try:
            mid = app.dispatch("test.order.placed", {"order_id": "child"})
            os.write(write, mid.encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    child_id = os.read(read, 100).decode()
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(child_id) == 36
    await asyncio.to_thread(app.dispatch, "test.order.placed", {"order_id": "parent-2"})
    assert await broker.wait_count(queue, 3) == 3


async def test_module_level_dispatch_uses_the_default_app(
    tap: tuple[Pigeon, str], broker: Broker
) -> None:
    app, queue = tap
    set_default_app(app)
    try:
        mid = await pigeon.dispatch_async("test.order.placed", {"order_id": "m-1"})
        mid2 = await asyncio.to_thread(pigeon.dispatch, OrderPlaced(order_id="m-2"))
    finally:
        set_default_app(None)
    assert mid != mid2
    message = await broker.get(queue)
    assert message.message_id == mid


async def test_a_broker_that_is_down_raises_dispatch_error_after_the_timeout(prefix: str) -> None:
    settings = unique_settings(prefix, url="amqp://guest:s3cret@127.0.0.1:1/", dispatch_timeout=1.5)
    app = Pigeon(service="orders", settings=settings)
    started = time.monotonic()
    with pytest.raises(DispatchError) as info:
        await asyncio.wait_for(app.dispatch_async(OrderPlaced(order_id="o-1")), 60)
    assert time.monotonic() - started >= 1.0, "it kept trying for the dispatch timeout"
    assert "s3cret" not in str(info.value)
    assert "amqp://guest:***@127.0.0.1:1/" in str(info.value)
    assert info.value.__cause__ is not None
    await app.close()


async def test_an_event_without_listeners_is_kept_in_the_unrouted_queue(
    make_app: AppFactory, broker: Broker
) -> None:
    app = make_app("orders")
    await app.dispatch_async("test.nobody.listens", {"x": 1})
    message = await broker.get(app.settings.unrouted_queue)
    assert message.routing_key == "test.nobody.listens"
    await app.close()


async def test_the_unrouted_queue_is_bounded_and_refuses_rather_than_drops(
    prefix: str, broker: Broker
) -> None:
    settings = unique_settings(prefix, unrouted_max_length=2, dispatch_timeout=1.0)
    broker.track(settings)
    app = Pigeon(service="orders", settings=settings)
    broker.apps.append(app)
    with pytest.raises(DispatchError, match="refused it") as info:  # noqa: PT012
        for n in range(10):
            await app.dispatch_async("test.nobody.listens", {"n": n})
    assert "reject-publish" in str(info.value)
    stored = await broker.count(settings.unrouted_queue)
    # Quorum queues admit one message past x-max-length before refusing.
    assert 2 <= stored <= 3
    assert n == stored, "every dispatch before the refusal was kept"


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("amqps://user:pa:ss@host:5671/vh") == "amqps://user:***@host:5671/vh"
    assert mask_url("amqp://host/") == "amqp://host/"


async def test_dispatch_many_confirms_every_event_and_returns_their_ids(
    tap: tuple[Pigeon, str], broker: Broker
) -> None:
    app, queue = tap
    events = [OrderPlaced(order_id=f"o-{i}") for i in range(2500)]
    ids = await app.dispatch_many([*events, ("test.order.cancelled", {"order_id": "o-0"})])
    assert len(ids) == 2501
    assert len(set(ids)) == 2501
    assert await broker.count(queue) == 2501, "confirmed means stored when it returns"
    first = await broker.get(queue)
    assert first.message_id == ids[0]
    assert first.type == "test.order.placed"


async def test_dispatch_many_raises_instead_of_dropping_what_the_broker_refused(
    prefix: str, broker: Broker
) -> None:
    settings = unique_settings(prefix, unrouted_max_length=5, dispatch_timeout=1.0)
    broker.track(settings)
    app = Pigeon(service="orders", settings=settings)
    broker.apps.append(app)
    # A quorum queue applies x-max-length a little late under a burst, so it takes a
    # few batches to fill; then the refusal must surface, not vanish.
    with pytest.raises(DispatchError, match="refused it"):  # noqa: PT012
        for _ in range(10):
            await app.dispatch_many(("test.nobody.listens", {"n": n}) for n in range(50))
