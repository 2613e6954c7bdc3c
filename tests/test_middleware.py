"""Middleware: order, failure semantics, and each built-in."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from pigeon import Context, Pigeon, Retry
from pigeon.delivery import Delivery
from pigeon.idempotency import IdempotencyStore, open_store
from pigeon.middleware import (
    CallNext,
    Logging,
    Metrics,
    RateLimit,
    Timeout,
    WithoutOverlapping,
)
from pigeon.testing import deliver
from tests.conftest import AppFactory, RunWorker, eventually
from tests.events import OrderPlaced


class Trace:
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
        self.calls.append(f"{self.name} in")
        try:
            await call_next(delivery)
        finally:
            self.calls.append(f"{self.name} out")


async def test_middleware_runs_in_list_order_and_a_listener_can_extend_the_apps() -> None:
    calls: list[str] = []
    app = Pigeon(service="svc", middleware=[Trace("app", calls)])

    @app.listener(OrderPlaced, middleware=[*app.middleware, Trace("mine", calls)])
    async def handle(event: OrderPlaced) -> None:
        calls.append("handler")

    assert (await deliver(app, OrderPlaced(order_id="o-1"))).acked
    assert calls == ["app in", "mine in", "handler", "mine out", "app out"]


async def test_every_app_has_the_metrics_middleware_unless_given_its_own_list() -> None:
    assert any(isinstance(m, Metrics) for m in Pigeon(service="a").middleware)
    assert Pigeon(service="b", middleware=[]).middleware == []


async def test_a_middleware_that_raises_fails_the_message_with_the_normal_retry_path() -> None:
    class Broken:
        async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
            raise RuntimeError("middleware bug")

    app = Pigeon(service="svc", middleware=[Broken()])
    ran: list[str] = []

    @app.listener(OrderPlaced, retry=Retry(attempts=2, delays=[3]))
    async def handle(event: OrderPlaced) -> None:
        ran.append("handler")

    first = await deliver(app, OrderPlaced(order_id="o-1"))
    assert first.retried
    assert first.delay == 3
    last = await deliver(app, OrderPlaced(order_id="o-1"), attempt=2)
    assert last.dead_lettered
    assert last.headers["x-pigeon-exception-message"] == "middleware bug"
    assert ran == []


async def test_a_middleware_may_decide_without_calling_the_handler_and_it_is_logged() -> None:
    class Skip:
        async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
            return None

    app = Pigeon(service="svc", middleware=[Skip()])
    ran: list[str] = []

    @app.listener(OrderPlaced)
    async def handle(event: OrderPlaced) -> None:
        ran.append("handler")

    with capture_logs() as logs:
        outcome = await deliver(app, OrderPlaced(order_id="o-1"))
    assert outcome.acked
    assert ran == []
    assert any(entry["event"] == "middleware.decided" for entry in logs)


async def test_logging_logs_each_handler_call_with_its_duration() -> None:
    app = Pigeon(service="svc", middleware=[Logging()])

    @app.listener(OrderPlaced, retry=Retry(attempts=1))
    async def handle(event: OrderPlaced) -> None:
        if event.order_id == "bad":
            raise ValueError("nope")

    with capture_logs() as logs:
        await deliver(app, OrderPlaced(order_id="good"))
        await deliver(app, OrderPlaced(order_id="bad"))
    finished = [e for e in logs if e["event"] == "handler.finished"]
    assert len(finished) == 2
    assert all(e["duration_ms"] >= 0 for e in finished)
    assert finished[1]["error"] == "ValueError('nope')"
    assert finished[0]["message_id"]


async def test_timeout_cancels_a_slow_handler_and_fails_it_as_a_timeout() -> None:
    app = Pigeon(service="svc", middleware=[Timeout(0.1)])

    @app.listener(OrderPlaced, retry=Retry(attempts=1))
    async def handle(event: OrderPlaced) -> None:
        await asyncio.Event().wait()  # never ends unless cancelled

    outcome = await asyncio.wait_for(deliver(app, OrderPlaced(order_id="o-1")), 60)
    assert outcome.dead_lettered
    assert outcome.reason == "timeout"


async def test_rate_limit_postpones_through_the_tiers_without_spending_attempts() -> None:
    app = Pigeon(service="svc", middleware=[RateLimit(2, per=10, key=lambda e: e.customer_email)])
    handled: list[str] = []

    @app.listener(OrderPlaced)
    async def handle(event: OrderPlaced) -> None:
        handled.append(event.order_id)

    outcomes = [
        await deliver(app, OrderPlaced(order_id=f"o-{i}", customer_email="a@x.io"))
        for i in range(3)
    ]
    assert [o.kind for o in outcomes] == ["acked", "acked", "retried"]
    assert outcomes[2].attempt == 1, "a postponement is not an attempt"
    assert outcomes[2].delay == 10.0, "rounded up to a shared tier"
    other = await deliver(app, OrderPlaced(order_id="o-9", customer_email="b@x.io"))
    assert other.acked, "another key has its own window"
    assert handled == ["o-0", "o-1", "o-9"]


async def test_rate_limited_messages_all_arrive_over_the_broker_without_busy_looping(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("mailer")
    app.middleware = [RateLimit(2, per=0.5)]
    handled: list[float] = []

    @app.listener(OrderPlaced)
    async def send(event: OrderPlaced) -> None:
        handled.append(time.monotonic())

    worker = await run_worker(app)
    for i in range(6):
        await app.dispatch_async(OrderPlaced(order_id=f"o-{i}"))
    await eventually(lambda: len(handled) == 6, timeout=20)
    assert worker.counts["retried"] <= 12, "postponed through tiers, not spun"
    assert max(handled) - min(handled) >= 0.9, "no more than 2 per half second"


STORE_URLS = {
    "memory": "memory://",
    "sqlite": "sqlite:///{tmp}/locks.db",
    "redis": "redis://127.0.0.1:6379/0",
    "postgres": "postgresql://postgres@127.0.0.1:5432/test",
}


@pytest.fixture(params=list(STORE_URLS))
async def two_stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[IdempotencyStore, IdempotencyStore]]:
    """Two clients of one store, standing in for two listener processes."""
    url = STORE_URLS[request.param].format(tmp=tmp_path)
    first = open_store(url)
    second = first if url == "memory://" else open_store(url)
    await first.open()
    await second.open()
    yield first, second
    await first.close()
    await second.close()


async def test_without_overlapping_never_runs_two_handlers_for_one_key(
    two_stores: tuple[IdempotencyStore, IdempotencyStore],
) -> None:
    app = Pigeon(service="svc", middleware=[WithoutOverlapping(key=lambda e: e.order_id)])
    running: dict[str, int] = {}
    peak: dict[str, int] = {}

    @app.listener(OrderPlaced)
    async def handle(event: OrderPlaced, ctx: Context) -> None:
        running[event.order_id] = running.get(event.order_id, 0) + 1
        peak[event.order_id] = max(peak.get(event.order_id, 0), running[event.order_id])
        await asyncio.sleep(0.05)
        running[event.order_id] -= 1

    results = await asyncio.gather(
        *(
            deliver(app, OrderPlaced(order_id=f"o-{i % 2}"), store=two_stores[i % 2 == 0])
            for i in range(8)
        )
    )
    assert all(r.acked for r in results)
    assert peak == {"o-0": 1, "o-1": 1}


async def test_without_overlapping_lets_different_keys_run_together() -> None:
    app = Pigeon(service="svc", middleware=[WithoutOverlapping(key=lambda e: e.order_id)])
    running = 0
    peak = 0

    @app.listener(OrderPlaced)
    async def handle(event: OrderPlaced) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    await asyncio.gather(*(deliver(app, OrderPlaced(order_id=f"o-{i}")) for i in range(4)))
    assert peak == 4


async def test_without_overlapping_postpones_when_the_key_stays_busy() -> None:
    lock = WithoutOverlapping(key=lambda e: e.order_id, wait=0.2)
    app = Pigeon(service="svc", middleware=[lock])
    release, holding = asyncio.Event(), asyncio.Event()

    @app.listener(OrderPlaced)
    async def handle(event: OrderPlaced, ctx: Context) -> None:
        if ctx.headers.get("first"):
            holding.set()
            await release.wait()

    store = open_store("memory://")
    await store.open()
    first = asyncio.create_task(
        deliver(app, OrderPlaced(order_id="o-1"), headers={"first": 1}, store=store)
    )
    await asyncio.wait_for(holding.wait(), 10)  # the first holds the key now
    second = await deliver(app, OrderPlaced(order_id="o-1"), store=store)
    assert second.retried
    assert second.attempt == 1
    release.set()
    assert (await first).acked
    await store.close()


def _metric(text: str, name: str, **labels: Any) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(part in line for part in want.split(",")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_outcomes_and_time_handlers(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    from prometheus_client import generate_latest

    app = make_app("metered")

    @app.listener(OrderPlaced, retry=Retry(attempts=1))
    async def handle(event: OrderPlaced) -> None:
        if event.order_id == "bad":
            raise ValueError("bad order")

    await run_worker(app)
    before = generate_latest().decode()
    queue = handle.queue
    for order_id in ("a", "b", "bad"):
        await app.dispatch_async(OrderPlaced(order_id=order_id))
    text = ""

    def counted() -> bool:
        nonlocal text
        text = generate_latest().decode()
        return _metric(text, "pigeon_messages_total", queue=queue, outcome="dead_lettered") == 1

    await eventually(counted)
    assert _metric(text, "pigeon_messages_total", queue=queue, outcome="acked") == 2
    assert _metric(text, "pigeon_handler_duration_seconds_count", queue=queue) == 3
    assert _metric(text, "pigeon_in_flight", queue=queue) == 0
    dispatched = _metric(text, "pigeon_dispatched_total", event="test.order.placed")
    assert dispatched - _metric(before, "pigeon_dispatched_total", event="test.order.placed") >= 3
