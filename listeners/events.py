"""The events of the order story: the contract between its services.

Every service imports its events from here; in a real system this module is
a small shared package, or the producer's published schema. An event says
what happened (past tense) and carries what its listeners need, so nobody
has to call the producer back to ask.

Listeners ignore fields they do not know, so adding a field never breaks
them. Give new fields a default, so events from older producers still
validate; rename or remove a field only with a new event name or version.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from pigeon import Event


class LineItem(BaseModel):
    sku: str
    name: str
    quantity: int = Field(ge=1)
    unit_price_cents: int = Field(ge=0)


class OrderPlaced(Event, name="order.placed"):
    """A customer placed an order; dispatched by the orders service once it is stored."""

    order_id: str
    customer_email: str
    customer_name: str
    region: str
    items: list[LineItem]
    total_cents: int = Field(ge=0)
    currency: str = "EUR"
    placed_at: datetime


class ShipmentReady(Event, name="shipment.ready"):
    """The seller reserved the goods and packed them; the parcels wait for pickup."""

    order_id: str
    shipment_id: str
    warehouse: str
    region: str
    parcels: int = Field(ge=1)


class DeliveryAssigned(Event, name="delivery.assigned"):
    """Logistics booked a delivery partner; the customer can track the parcel."""

    order_id: str
    customer_email: str
    customer_name: str
    region: str
    partner: str
    tracking_code: str
    tracking_url: str
