"""Prefetch is deeper than concurrency; concurrency still bounds the handlers."""

from __future__ import annotations

import asyncio

import aio_pika

from pigeon.idempotency.base import Claim
from pigeon.idempotency.memory import MemoryStore
from pigeon.worker import PREFETCH_PER_HANDLER
from tests.conftest import AMQP_URL, AppFactory, RunWorker, eventually
from tests.events import OrderPlaced


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.claims = 0

    async def claim(self, key: str, lease: float) -> Claim:
        self.claims += 1
        return await super().claim(key, lease)


async def ready_in(queue: str) -> int:
    """Messages in ``queue`` not yet delivered to any consumer."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count
    finally:
        await connection.close()


async def test_concurrency_bounds_handlers_while_prefetched_messages_are_claimed(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("orders")
    release = asyncio.Event()
    running = 0
    most = 0
    handled: list[str] = []

    @app.listener(OrderPlaced)
    async def slow(event: OrderPlaced) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        handled.append(event.order_id)

    store = CountingStore()
    await run_worker(app, concurrency=2, store=store)
    for i in range(8):
        await app.dispatch_async(OrderPlaced(order_id=f"o-{i}"))
    # The claims (one store round for all of them) do not wait for a handler slot.
    await eventually(lambda: store.claims == 8 and running == 2, message="8 claims, 2 running")
    release.set()
    await eventually(lambda: len(handled) == 8)
    assert most == 2


async def test_default_prefetch_is_a_multiple_of_concurrency(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("orders")
    release = asyncio.Event()

    @app.listener(OrderPlaced, idempotent=False)
    async def slow(event: OrderPlaced) -> None:
        await release.wait()

    await run_worker(app, concurrency=3)
    total = 3 * PREFETCH_PER_HANDLER + 5
    for i in range(total):
        await app.dispatch_async(OrderPlaced(order_id=f"o-{i}"))
    ready: list[int] = []

    async def poll() -> None:
        while True:
            ready.append(await ready_in(slow.queue))
            await asyncio.sleep(0.05)

    poller = asyncio.create_task(poll())
    try:
        await eventually(lambda: bool(ready) and ready[-1] == 5, message="5 left in the queue")
    finally:
        poller.cancel()
        release.set()


async def test_a_graceful_stop_hands_back_prefetched_messages_without_running_them(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("orders")
    release = asyncio.Event()
    started: list[str] = []

    @app.listener(OrderPlaced, lease=60)
    async def slow(event: OrderPlaced) -> None:
        started.append(event.order_id)
        await release.wait()

    store = CountingStore()
    worker = await run_worker(app, concurrency=1, store=store)
    for i in range(3):
        await app.dispatch_async(OrderPlaced(order_id=f"o-{i}"))
    await eventually(lambda: store.claims == 3 and len(started) == 1, message="3 claimed, 1 run")
    worker.stop("test")
    release.set()
    await eventually(lambda: not worker.ready.is_set(), message="the first worker stopped")
    # Their claims were released, so another worker runs them now, not after the 60 s lease.
    second = await run_worker(app, concurrency=1, store=store)
    await eventually(lambda: sorted(started) == ["o-0", "o-1", "o-2"], message="all three ran")
    await eventually(lambda: second.counts["acked"] == 2, message="the second acked two")
    assert worker.counts["acked"] == 1
