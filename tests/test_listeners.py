"""Unit tests of the example services with pigeon.testing: no broker, real pipeline.

These are the examples docs/testing.md points to: one per listener in listeners/.
"""

from __future__ import annotations

import email
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from listeners import logistics, notification, seller
from listeners.events import DeliveryAssigned, LineItem, OrderPlaced, ShipmentReady
from pigeon.testing import deliver, fake


def order(order_id: str = "o-42", region: str = "eu-west") -> OrderPlaced:
    return OrderPlaced(
        order_id=order_id,
        customer_email="ada@example.com",
        customer_name="Ada Lovelace",
        region=region,
        items=[LineItem(sku="TEA-01", name="Darjeeling", quantity=2, unit_price_cents=650)],
        total_cents=1300,
        placed_at=datetime(2026, 11, 22, tzinfo=UTC),
    )


async def test_notification_writes_the_confirmation_email(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notification, "MAIL_DIR", tmp_path)
    outcome = await deliver(
        notification.app, order(), listener="send-confirmation", message_id="m-1"
    )
    assert outcome.acked
    mail = email.message_from_bytes((tmp_path / "o-42.confirmation.eml").read_bytes())
    assert mail["To"] == "Ada Lovelace <ada@example.com>"
    assert mail["Subject"] == "Your order o-42"
    assert mail["X-Pigeon-Message-Id"] == "m-1"
    assert "13.00 EUR" in mail.get_payload()


async def test_notification_writes_the_tracking_email(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notification, "MAIL_DIR", tmp_path)
    assigned = DeliveryAssigned(
        order_id="o-42",
        customer_email="ada@example.com",
        customer_name="Ada Lovelace",
        region="eu-west",
        partner="Colis Express",
        tracking_code="CE123",
        tracking_url="https://track.shop.example/CE123",
    )
    assert (await deliver(notification.app, assigned)).acked
    text = (tmp_path / "o-42.tracking.eml").read_text()
    assert "Tracking code: CE123" in text


async def test_seller_reserves_once_and_announces_the_shipment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(seller, "DATABASE", tmp_path / "seller.db")
    with fake() as bus:
        first = await deliver(seller.app, order(), message_id="m-1", correlation_id="c-42")
        replay = await deliver(seller.app, order(), message_id="m-2")  # a duplicate order.placed
    assert first.acked
    assert replay.acked
    shipped = bus.assert_dispatched(ShipmentReady, count=2)
    assert shipped[0].payload["shipment_id"] == shipped[1].payload["shipment_id"], "reserved once"
    assert shipped[0].correlation_id == "c-42"
    assert shipped[0].causation_id == "m-1"
    assert shipped[0].message_id == "m-1.shipment-ready"


async def test_logistics_assigns_a_partner_and_announces_the_delivery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logistics, "PARTNERS_FILE", tmp_path / "partners.json")
    (tmp_path / "partners.json").write_text(json.dumps({"eu-west": "Colis Express"}))
    with fake() as bus:
        outcome = await deliver(logistics.app, order(), listener="assign-partner")
    assert outcome.acked
    bus.assert_dispatched(DeliveryAssigned, where={"partner": "Colis Express", "order_id": "o-42"})


async def test_logistics_retries_an_unserved_region_then_dead_letters_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logistics, "PARTNERS_FILE", tmp_path / "partners.json")
    (tmp_path / "partners.json").write_text(json.dumps({"eu-west": "Colis Express"}))
    atlantis = order(region="atlantis")
    with fake() as bus:
        first = await deliver(logistics.app, atlantis, listener="assign-partner")
        last = await deliver(logistics.app, atlantis, listener="assign-partner", attempt=3)
    assert first.retried
    assert first.delay == 1
    assert last.dead_lettered
    assert last.headers["x-pigeon-exception-type"] == "listeners.logistics.NoPartnerForRegion"
    assert "add-partner atlantis" in last.headers["x-pigeon-exception-message"]
    bus.assert_nothing_dispatched()


async def test_logistics_schedules_the_pickup_of_a_ready_shipment() -> None:
    ready = ShipmentReady(
        order_id="o-42", shipment_id="s-1", warehouse="Lyon", region="eu-west", parcels=1
    )
    assert (await deliver(logistics.app, ready)).acked
