"""``await worker.join()``: wait until the worker is idle, so a test can assert exactly
what happened, with no sleep that passes vacuously on a slow machine."""

from __future__ import annotations

import asyncio

import pytest

from pigeon import Context, Retry, RetryLater
from tests.conftest import AppFactory, RunWorker
from tests.events import OrderPlaced


async def test_join_waits_for_the_retries_still_waiting_in_their_tier(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("seller")
    attempts: list[int] = []

    @app.listener(OrderPlaced, retry=Retry(attempts=4, delays=[0.3]))
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("stock service is down")

    worker = await run_worker(app)
    await app.dispatch_async(OrderPlaced(order_id="o-1"))
    await worker.join(timeout=30)
    assert attempts == [1, 2, 3]
    assert worker.counts == {"retried": 2, "acked": 1}


async def test_join_waits_for_a_postponed_message_and_every_message_in_the_queue(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("logistics")
    seen: list[str] = []

    @app.listener(OrderPlaced, concurrency=2)
    async def book(event: OrderPlaced, ctx: Context) -> None:
        if event.order_id == "later" and ctx.attempt == 1:
            raise RetryLater(0.25, "courier API asks us to come back")
        seen.append(event.order_id)

    worker = await run_worker(app)
    await app.dispatch_many([OrderPlaced(order_id=f"o-{i}") for i in range(50)])
    await app.dispatch_async(OrderPlaced(order_id="later"))
    await worker.join(timeout=30)
    assert sorted(seen) == sorted([f"o-{i}" for i in range(50)] + ["later"])


async def test_join_returns_when_nothing_was_dispatched(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("audit")

    @app.listener(OrderPlaced)
    async def record(event: OrderPlaced) -> None:
        raise AssertionError("nothing is dispatched")

    worker = await run_worker(app)
    await worker.join(timeout=10)
    assert worker.counts == {}


async def test_join_raises_timeout_error_while_a_handler_still_runs(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("notification")
    release = asyncio.Event()
    started = asyncio.Event()

    @app.listener(OrderPlaced)
    async def send(event: OrderPlaced) -> None:
        started.set()
        await release.wait()

    worker = await run_worker(app)
    await app.dispatch_async(OrderPlaced(order_id="o-1"))
    await asyncio.wait_for(started.wait(), 15)
    with pytest.raises(TimeoutError):
        await worker.join(timeout=0.2)
    release.set()
    await worker.join(timeout=15)
    assert worker.counts == {"acked": 1}
