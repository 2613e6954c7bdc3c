"""pigeon.testing: the fake bus and deliver(), as a service's own tests would use them."""

from __future__ import annotations

from typing import Any

import pytest

import pigeon
from pigeon import Context, Pigeon, Reject, Retry
from pigeon.delivery import Delivery
from pigeon.middleware import CallNext
from pigeon.testing import FakeBus, deliver, fake
from tests.events import OrderCancelled, OrderPlaced, ShipmentReady


def make_seller(**kwargs: Any) -> Pigeon:
    app = Pigeon(service="seller", **kwargs)

    @app.listener(OrderPlaced, retry=Retry(attempts=3, delays=[5, 30]))
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        if event.total_cents < 0:
            raise Reject("negative total")
        if event.customer_email == "flaky@example.com":
            raise ConnectionError("warehouse API down")
        await ctx.dispatch(ShipmentReady(order_id=event.order_id))

    return app


def test_fake_captures_sync_and_module_level_dispatches() -> None:
    app = Pigeon(service="orders")
    with fake() as bus:
        first = app.dispatch(OrderPlaced(order_id="o-1"))
        second = pigeon.dispatch("test.order.cancelled", {"order_id": "o-1", "reason": "x"})
    assert [d.message_id for d in bus.dispatched()] == [first, second]
    placed = bus.assert_dispatched(OrderPlaced, where=lambda e: e.order_id == "o-1")
    assert isinstance(placed[0].event, OrderPlaced)
    assert placed[0].app_id == "orders"
    bus.assert_dispatched("test.order.cancelled", where={"reason": "x"}, count=1)
    bus.assert_dispatch_count(OrderPlaced, 1)
    bus.assert_not_dispatched(ShipmentReady)


def test_every_assertion_fails_when_it_should_and_lists_what_was_dispatched() -> None:
    with fake() as bus:
        pigeon.dispatch(OrderPlaced(order_id="o-1"))
    with pytest.raises(
        AssertionError, match=r"(?s)expected test\.shipment\.ready.*test\.order\.placed"
    ):
        bus.assert_dispatched(ShipmentReady)
    with pytest.raises(AssertionError, match="found 0"):
        bus.assert_dispatched(OrderPlaced, where={"order_id": "o-2"})
    with pytest.raises(AssertionError, match="expected 2 x"):
        bus.assert_dispatched(OrderPlaced, count=2)
    with pytest.raises(AssertionError, match=r"expected no test\.order\.placed, found 1"):
        bus.assert_not_dispatched(OrderPlaced)
    with pytest.raises(AssertionError, match=r"expected 3 x test\.order\.placed, found 1"):
        bus.assert_dispatch_count(OrderPlaced, 3)
    with pytest.raises(AssertionError, match="expected nothing dispatched"):
        bus.assert_nothing_dispatched()
    bus.clear()
    bus.assert_nothing_dispatched()
    with pytest.raises(AssertionError, match="nothing was dispatched"):
        bus.assert_dispatched(OrderPlaced)


async def test_deliver_acks_and_captures_what_the_handler_dispatched() -> None:
    app = make_seller()
    with fake() as bus:
        outcome = await deliver(app, OrderPlaced(order_id="o-1"), message_id="m-1")
    assert outcome.acked
    shipped = bus.assert_dispatched(ShipmentReady, where={"order_id": "o-1"})
    assert shipped[0].causation_id == "m-1"
    assert shipped[0].correlation_id == "m-1"


async def test_deliver_reports_a_retry_with_its_delay() -> None:
    outcome = await deliver(
        make_seller(), OrderPlaced(order_id="o-1", customer_email="flaky@example.com")
    )
    assert outcome.retried
    assert outcome.delay == 5
    assert outcome.attempt == 2
    assert isinstance(outcome.error, ConnectionError)
    last = await deliver(
        make_seller(), OrderPlaced(order_id="o-1", customer_email="flaky@example.com"), attempt=3
    )
    assert last.dead_lettered
    assert last.reason == "handler-error"
    assert last.headers["x-pigeon-attempts"] == 3


async def test_deliver_dead_letters_rejects_and_invalid_payloads_with_the_reason() -> None:
    app = make_seller()
    rejected = await deliver(app, OrderPlaced(order_id="o-1", total_cents=-1))
    assert rejected.dead_lettered
    assert rejected.reason == "rejected"
    assert rejected.headers["x-pigeon-exception-message"] == "negative total"
    broken = await deliver(app, "test.order.placed", b'{"order_id": ', listener="reserve")
    assert broken.dead_lettered
    assert broken.reason == "invalid-payload"


async def test_deliver_the_same_message_id_twice_is_a_duplicate() -> None:
    app = make_seller()
    with fake() as bus:
        assert (await deliver(app, OrderPlaced(order_id="o-1"), message_id="same")).acked
        second = await deliver(app, OrderPlaced(order_id="o-1"), message_id="same")
    assert second.kind == "duplicate"
    bus.assert_dispatch_count(ShipmentReady, 1)


async def test_deliver_runs_the_fallback_and_the_middleware() -> None:
    seen: list[str] = []

    class Audit:
        async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
            seen.append(f"before {delivery.event_name}")
            await call_next(delivery)

    app = Pigeon(service="notification", middleware=[Audit()])

    @app.listener(OrderCancelled, retry=Retry(attempts=1))
    def notify(event: OrderCancelled) -> None:
        raise ValueError("no template")

    @notify.fallback
    def gave_up(event: OrderCancelled, ctx: Context, error: BaseException) -> None:
        seen.append(f"fallback {error}")

    outcome = await deliver(app, OrderCancelled(order_id="o-9"))
    assert outcome.dead_lettered
    assert seen == ["before test.order.cancelled", "fallback no template"]


async def test_deliver_names_the_listeners_when_the_choice_is_ambiguous() -> None:
    app = Pigeon(service="audit")

    @app.listener("test.order.*")
    async def one(payload: dict[str, Any]) -> None: ...

    @app.listener("test.#")
    async def two(payload: dict[str, Any]) -> None: ...

    with pytest.raises(LookupError, match="pass listener=NAME"):
        await deliver(app, OrderPlaced(order_id="o-1"))
    assert (await deliver(app, OrderPlaced(order_id="o-1"), listener="two")).acked


def test_the_pytest_plugin_fixtures(pigeon_fake: FakeBus, pigeon_app: Pigeon) -> None:
    pigeon_app.dispatch(OrderPlaced(order_id="o-1"))
    pigeon_fake.assert_dispatched(OrderPlaced)
    assert pigeon_app.service == "test"
