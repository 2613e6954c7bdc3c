"""Event types shared by the tests (the order story, in miniature)."""

from __future__ import annotations

from pigeon import Event


class OrderPlaced(Event, name="test.order.placed"):
    order_id: str
    customer_email: str = "customer@example.com"
    total_cents: int = 500


class OrderCancelled(Event, name="test.order.cancelled"):
    order_id: str
    reason: str = "changed mind"


class ShipmentReady(Event, name="test.shipment.ready"):
    order_id: str
