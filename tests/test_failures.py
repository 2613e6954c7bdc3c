"""Nothing lost: retries, fallbacks and dead letters, with the reason on each."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from datetime import datetime
from typing import Any

import aio_pika
import pytest

from pigeon import Context, Event, Reject, Retry, RetryLater, headers
from tests.conftest import AppFactory, Broker, RunWorker, eventually
from tests.events import OrderPlaced

FAST = Retry(attempts=3, delays=[0.2])


async def publish_raw(
    broker: Broker, exchange: str, routing_key: str, message: aio_pika.Message
) -> None:
    channel = await broker.connection.channel(publisher_confirms=True)
    ex = await channel.get_exchange(exchange, ensure=False)
    await ex.publish(message, routing_key)
    await channel.close()


async def test_a_flaky_handler_succeeds_on_attempt_three_and_its_effect_happens_once(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("notification")
    attempts: list[int] = []
    sent: list[str] = []

    @app.listener(OrderPlaced, retry=Retry(attempts=5, delays=[0.2]))
    async def send_confirmation(event: OrderPlaced, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("smtp is down")
        sent.append(event.order_id)

    worker = await run_worker(app)
    await app.dispatch_async(OrderPlaced(order_id="o-1"))
    await worker.join(timeout=30)
    assert attempts == [1, 2, 3]
    assert sent == ["o-1"]


async def test_an_always_failing_listener_ends_in_the_dead_letters_with_every_header(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("logistics")
    attempts: list[int] = []

    class NoPartnerForRegionError(Exception):
        pass

    @app.listener(OrderPlaced, retry=Retry(attempts=4, delays=[0.1, 0.2]))
    async def assign_partner(event: OrderPlaced, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise NoPartnerForRegionError(f"no partner for order {event.order_id}")

    worker = await run_worker(app)
    message_id = await app.dispatch_async(OrderPlaced(order_id="o-42"), correlation_id="c-42")
    letter = await broker.get(app.settings.dead_letter_queue, timeout=15)
    assert attempts == [1, 2, 3, 4]
    assert letter.message_id == message_id
    assert letter.correlation_id == "c-42"
    assert letter.type == "test.order.placed"
    assert letter.app_id == app.service
    assert json.loads(letter.body)["order_id"] == "o-42"
    assert letter.routing_key == assign_partner.queue
    h = letter.headers
    assert h[headers.REASON] == "handler-error"
    assert str(h[headers.EXCEPTION_TYPE]).endswith("NoPartnerForRegionError")
    assert h[headers.EXCEPTION_MESSAGE] == "no partner for order o-42"
    assert "NoPartnerForRegionError" in str(h[headers.TRACEBACK])
    assert h[headers.QUEUE] == assign_partner.queue
    assert h[headers.LISTENER] == "assign-partner"
    assert h[headers.ATTEMPTS] == 4
    assert datetime.fromisoformat(str(h[headers.FAILED_AT])).tzinfo is not None
    assert headers.ATTEMPT not in h
    await worker.join(timeout=30)
    assert attempts == [1, 2, 3, 4], "exactly N attempts, nothing after the dead letter"


async def test_delayed_retries_wait_for_their_tier(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("seller")
    moments: list[float] = []

    @app.listener(OrderPlaced, retry=Retry(attempts=3, delays=[0.5, 1.5]))
    async def reserve(event: OrderPlaced) -> None:
        moments.append(time.monotonic())
        raise RuntimeError("warehouse offline")

    await run_worker(app)
    await app.dispatch_async(OrderPlaced(order_id="o-1"))
    await broker.get(app.settings.dead_letter_queue, timeout=20)
    gaps = [b - a for a, b in itertools.pairwise(moments)]
    assert len(gaps) == 2
    assert gaps[0] >= 0.45
    assert gaps[1] >= 1.45
    assert await broker.count(f"{reserve.queue}.retry.500ms") == 0
    assert await broker.count(f"{reserve.queue}.retry.1500ms") == 0


async def test_immediate_retries_run_in_process_before_the_delayed_ones(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("seller")
    attempts: list[int] = []

    @app.listener(OrderPlaced, retry=Retry(attempts=4, immediate=2, delays=[0.2]))
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt < 4:
            raise TimeoutError("db busy")

    await run_worker(app)
    await app.dispatch_async(OrderPlaced(order_id="o-1"))
    await eventually(lambda: attempts == [1, 2, 3, 4])


async def test_the_fallback_runs_once_before_the_dead_letter_even_when_it_fails(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("notification")
    gave_up: list[tuple[str, str, int]] = []

    @app.listener(OrderPlaced, retry=Retry(attempts=2, delays=[0.1]))
    async def send(event: OrderPlaced) -> None:
        raise ValueError("template missing")

    @send.fallback
    async def gave_up_on_it(event: OrderPlaced, ctx: Context, error: BaseException) -> None:
        gave_up.append((event.order_id, str(error), ctx.attempt))
        raise RuntimeError("the fallback is broken too")

    await run_worker(app)
    await app.dispatch_async(OrderPlaced(order_id="o-7"))
    letter = await broker.get(app.settings.dead_letter_queue)
    assert gave_up == [("o-7", "template missing", 2)]
    assert letter.headers[headers.EXCEPTION_MESSAGE] == "template missing"


async def test_reject_goes_straight_to_the_dead_letters_without_retry_or_fallback(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("seller")
    calls: list[int] = []
    fallbacks: list[str] = []

    @app.listener(OrderPlaced, retry=FAST)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append(ctx.attempt)
        raise Reject("order total is negative")

    @reserve.fallback
    def fb(event: OrderPlaced, ctx: Context, error: BaseException) -> None:
        fallbacks.append("ran")

    await run_worker(app)
    await app.dispatch_async(OrderPlaced(order_id="o-1", total_cents=-5))
    letter = await broker.get(app.settings.dead_letter_queue)
    assert calls == [1]
    assert fallbacks == []
    assert letter.headers[headers.REASON] == "rejected"
    assert letter.headers[headers.EXCEPTION_MESSAGE] == "order total is negative"


async def test_retry_later_postpones_through_a_tier_and_counts_as_an_attempt(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("logistics")
    moments: list[tuple[int, float]] = []

    @app.listener(OrderPlaced, retry=Retry(attempts=3, delays=[5]))
    async def assign(event: OrderPlaced, ctx: Context) -> None:
        moments.append((ctx.attempt, time.monotonic()))
        if ctx.attempt == 1:
            raise RetryLater(0.3, "partner API rate limited")

    await run_worker(app)
    await app.dispatch_async(OrderPlaced(order_id="o-1"))
    await eventually(lambda: len(moments) == 2)
    assert [a for a, _ in moments] == [1, 2]
    assert 0.25 <= moments[1][1] - moments[0][1] < 4.0


@pytest.mark.parametrize(
    ("body", "properties", "reason"),
    [
        (b'{"order_id": "o-1",', {}, "invalid-payload"),
        (b'{"total_cents": "lots"}', {}, "invalid-payload"),
        (b"<order id='o-1'/>", {"content_type": "application/xml"}, "unsupported-content-type"),
        (b'{"order_id": "' + b"x" * 5_000_000 + b'"}', {}, "body-too-large"),
    ],
    ids=["broken-json", "schema-invalid", "xml", "5mb-body"],
)
async def test_a_bad_message_is_dead_lettered_and_the_listener_keeps_serving(
    make_app: AppFactory,
    run_worker: RunWorker,
    broker: Broker,
    body: bytes,
    properties: dict[str, Any],
    reason: str,
) -> None:
    app = make_app("notification")
    handled: list[str] = []

    @app.listener(OrderPlaced, retry=FAST)
    async def send(event: OrderPlaced) -> None:
        handled.append(event.order_id)

    await run_worker(app)
    message = aio_pika.Message(body, message_id="bad-1", **properties)
    await publish_raw(broker, app.settings.exchange, "test.order.placed", message)
    letter = await broker.get(app.settings.dead_letter_queue)
    assert letter.message_id == "bad-1"
    assert letter.headers[headers.REASON] == reason
    assert letter.headers[headers.EXCEPTION_MESSAGE]
    assert letter.body == body, "the dead letter keeps the original bytes"
    await app.dispatch_async(OrderPlaced(order_id="good-1"))
    await eventually(lambda: handled == ["good-1"])


async def test_an_event_with_no_registered_class_is_dead_lettered_as_unknown(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("audit")
    seen: list[Event] = []

    @app.listener("test.#")
    async def audit(event: Event) -> None:
        seen.append(event)

    await run_worker(app)
    await app.dispatch_async("test.never.defined", {"a": 1})
    letter = await broker.get(app.settings.dead_letter_queue)
    assert letter.headers[headers.REASON] == "unknown-event"
    assert "test.never.defined" in str(letter.headers[headers.EXCEPTION_MESSAGE])
    await app.dispatch_async(OrderPlaced(order_id="o-1"))
    await eventually(lambda: len(seen) == 1)


async def test_a_hanging_handler_is_cancelled_at_its_timeout_and_dead_lettered(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("notification")
    handled: list[str] = []

    @app.listener(OrderPlaced, retry=Retry(attempts=2, delays=[0.1]), timeout=0.3)
    async def send(event: OrderPlaced) -> None:
        if event.order_id == "hang":
            await asyncio.sleep(3600)
        handled.append(event.order_id)

    await run_worker(app)
    await app.dispatch_async(OrderPlaced(order_id="hang"))
    letter = await broker.get(app.settings.dead_letter_queue)
    assert letter.headers[headers.REASON] == "timeout"
    assert letter.headers[headers.ATTEMPTS] == 2
    assert "timeout of 0.3s" in str(letter.headers[headers.EXCEPTION_MESSAGE])
    await app.dispatch_async(OrderPlaced(order_id="fine"))
    await eventually(lambda: handled == ["fine"])


async def test_a_hanging_sync_handler_times_out_too(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("notification")

    @app.listener(OrderPlaced, retry=Retry(attempts=1), timeout=0.3)
    def send(event: OrderPlaced) -> None:
        time.sleep(2)

    await run_worker(app)
    await app.dispatch_async(OrderPlaced(order_id="hang"))
    letter = await broker.get(app.settings.dead_letter_queue)
    assert letter.headers[headers.REASON] == "timeout"


async def test_a_handler_calling_sys_exit_does_not_stop_the_worker(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("notification")
    handled: list[str] = []

    @app.listener(OrderPlaced, retry=Retry(attempts=1))
    def send(event: OrderPlaced) -> None:
        if event.order_id == "exit":
            raise SystemExit(1)
        handled.append(event.order_id)

    await run_worker(app)
    await app.dispatch_async(OrderPlaced(order_id="exit"))
    letter = await broker.get(app.settings.dead_letter_queue)
    assert letter.headers[headers.EXCEPTION_TYPE] == "SystemExit"
    await app.dispatch_async(OrderPlaced(order_id="next"))
    await eventually(lambda: handled == ["next"])


async def test_a_huge_traceback_is_bounded_in_the_headers(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("notification")

    @app.listener(OrderPlaced, retry=Retry(attempts=1))
    async def send(event: OrderPlaced) -> None:
        raise ValueError("x" * 500_000)

    await run_worker(app)
    await app.dispatch_async(OrderPlaced(order_id="o-1"))
    letter = await broker.get(app.settings.dead_letter_queue)
    assert len(str(letter.headers[headers.EXCEPTION_MESSAGE])) <= 2_000
    assert len(str(letter.headers[headers.TRACEBACK])) <= 8_000


async def test_a_deleted_dead_letter_queue_is_declared_again_before_the_dead_letter(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("seller")

    @app.listener(OrderPlaced, retry=Retry(attempts=1))
    async def reserve(event: OrderPlaced) -> None:
        raise Reject("cannot ship")

    await run_worker(app)
    channel = await broker.connection.channel()
    await channel.queue_delete(app.settings.dead_letter_queue)
    await app.dispatch_async(OrderPlaced(order_id="o-1"))
    letter = await broker.get(app.settings.dead_letter_queue)
    assert letter.headers[headers.REASON] == "rejected"
