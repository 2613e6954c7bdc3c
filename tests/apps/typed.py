"""An app with a typed event, for ``pigeon dispatch --app`` tests (issue 14, item 9)."""

from __future__ import annotations

from pigeon import Event, Pigeon


class Shipped(Event, name="test.first-contact.shipped", version=2):
    order_id: str
    parcels: int


app = Pigeon(dispatches=[Shipped])
